"""The build really produced what the package promises."""

import subprocess
import sys

import pytest
import twins

PURE = twins.PURE_RUN


@pytest.mark.skipif(PURE, reason="this run tests the pure-Python twin")
def test_installed_versions_come_from_the_packages() -> None:
    # One version source per distribution: the metadata pip installed is the module's.
    from importlib import metadata

    import knock_client
    import knockd_fast

    assert metadata.version("knockd-fast") == knockd_fast.__version__
    assert metadata.version("knock-client") == knock_client.__version__


def test_extension_is_built_and_links_libpcap() -> None:
    # Fails when the Cython build was silently skipped: every other test would still pass.
    from knockd_fast import _capture_c

    assert _capture_c.libpcap_version().startswith("libpcap version ")


def test_selector_loads_the_expected_twin() -> None:
    from knockd_fast import _capture

    assert _capture.IMPLEMENTATION == ("python" if PURE else "cython")
    assert _capture.CaptureEngine.__module__ == (
        "knockd_fast._capture_py" if PURE else "knockd_fast._capture_c"
    )


def test_version_command_names_both_distributions() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "knockd_fast.cli", "version"],
        capture_output=True,
        text=True,
        check=True,
    )
    import knock_client
    import knockd_fast

    versions = f"knockd-fast {knockd_fast.__version__}, knock-client {knock_client.__version__}, "
    assert result.stdout.startswith(versions)
    assert ("extension not built" in result.stdout) == PURE


def test_importing_the_daemon_starts_no_blas_threads() -> None:
    # The daemon does no linear algebra: numpy's OpenBLAS threads would only burn CPU at start.
    script = (
        "import os; os.environ.pop('OPENBLAS_NUM_THREADS', None)\n"
        "import knockd_fast.daemon, numpy\n"
        "print(len(os.listdir('/proc/self/task')))"
    )
    threads = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert int(threads) == 1
