/* KF_DEBUG: 1 in the debug build (setup.py defines it when KNOCKD_FAST_DEBUG=1), else 0.
 * capture.pyx guards its invariant checks with `if KF_DEBUG:`; in a release build that is
 * `if (0)`, which the C compiler drops, so the checks cost the hot path nothing. */
#ifndef KF_DEBUG
#define KF_DEBUG 0
#endif
