# cython: language_level=3, embedsignature=True
"""The capture engine: libpcap, a nogil C callback, per-source state in fixed numpy buffers.

docs/capture.md is the specification; knockd_fast/_capture_py.py is the pure-Python twin
and must give the same completions and counters. Per packet, nothing here touches a
Python object: the callback reads the frame, the slot table and the completion ring
through raw pointers into buffers allocated once, in ``CaptureEngine.__cinit__``.
"""

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cimport numpy as cnp
cimport pcap

import ipaddress
import os

import numpy as np
from knock_client.protocol import MESSAGE_LEN_IPV4, MESSAGE_LEN_IPV6

from knockd_fast import capture_spec as spec
from knockd_fast.capture_spec import CaptureError  # the twins' one error class

cnp.import_array()

cdef extern from *:
    """
    /* The empty volatile asm is an effect GCC must keep: otherwise it deems a helper whose
       only effects are prefetches (prefetch_victims) pure and deletes its calls (GCC 12). */
    #define KF_PREFETCH(address) \
        do { __builtin_prefetch((const void *)(address)); __asm__ __volatile__(""); } while (0)
    #define KF_POPCOUNT64(x) __builtin_popcountll(x)
    """
    void KF_PREFETCH(const void *address) nogil
    int KF_POPCOUNT64(uint64_t x) nogil

cdef extern from "debug.h":
    bint KF_DEBUG  # a C constant: release builds compile `if KF_DEBUG:` blocks away

# The numbers below are C copies of capture_spec's; _check_layouts() asserts they agree.
cdef enum:
    N_ALT = 8                  # capture_spec.MAX_ALTERNATIVES
    ALT_PER_SEGMENT = 2        # capture_spec.ALTERNATIVES_PER_SEGMENT
    MSG_CAP = 48               # capture_spec.MESSAGE_CAPACITY
    MESSAGE_LEN_4 = 34
    MESSAGE_LEN_6 = 46
    MAX_TAGS = 4               # capture_spec.MAX_VLAN_TAGS
    MAX_EXT = 8                # capture_spec.MAX_IPV6_EXTENSION_HEADERS
    MAX_DESTINATIONS = 64      # capture_spec.MAX_DESTINATIONS
    STATE_FREE = 0
    STATE_PARTIAL = 1

cdef enum:  # link types with a header of their own (the others are raw IP)
    LINKTYPE_ETHERNET = 1
    LINKTYPE_LINUX_SLL = 113
    LINKTYPE_LINUX_SLL2 = 276
    LINKTYPE_IPV4 = 228
    LINKTYPE_IPV6 = 229

cdef enum:
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_IPV6 = 0x86DD
    ETHERTYPE_VLAN = 0x8100
    ETHERTYPE_QINQ = 0x88A8
    ETHERTYPE_QINQ_LEGACY = 0x9100

cdef enum:  # IP protocol numbers: the transports, and the IPv6 extension headers walked
    IPPROTO_HOPOPTS = 0
    IPPROTO_TCP = 6
    IPPROTO_UDP = 17
    IPPROTO_ROUTING = 43
    IPPROTO_FRAGMENT = 44
    IPPROTO_AH = 51
    IPPROTO_DSTOPTS = 60

cdef enum:
    TCP_SYN = 0x02
    TCP_ACK = 0x10
    KIND_KNOCK = 1             # completion record kinds
    KIND_SPA = 2

cdef enum:  # failed-knock reports (capture_spec.FAILED_*)
    FAILED_TIMED_OUT = 1
    FAILED_REFUSED_VERSION = 2
    FAILED_REFUSED_USER = 3
    FAILED_RING_CAPACITY = 256
    MIN_REPORTED_DIGITS = 4
    SWEEP_SLOTS = 65536

cdef enum:  # Engine.error: why the loop stopped; dispatch() raises CaptureError
    ERROR_NONE = 0
    ERROR_RING_FULL = 1
    # Broken invariants, checked in the debug build only:
    ERROR_ACTIVE_COUNT
    ERROR_INDEX_ENTRY
    ERROR_SLOT_DIGITS
    ERROR_RING_COUNT

cdef enum:  # counter indices, in capture_spec.COUNTER_NAMES order
    C_PACKETS, C_KNOCK_PACKETS, C_SPA_PACKETS, C_COMPLETIONS, C_DUPLICATES, C_CONFLICTS,
    C_ALTERNATIVES_DROPPED, C_EVICTIONS, C_EXPIRED, C_MALFORMED, C_IGNORED,
    C_REFUSED_MODE, C_REFUSED_VERSION, C_REFUSED_USER, N_COUNTERS

cdef enum:  # the digit pipeline (defer_digit): how many packets ahead each line is fetched
    PIPE_SIZE = 8              # a power of two, > WORK_AGE
    SLOT_AGE = 2               # its index entry was requested SLOT_AGE packets ago: find its slot
    WORK_AGE = 5               # its slot was requested WORK_AGE - SLOT_AGE packets ago

cdef enum:  # the message header: version (4 bits) and user id (12 bits), in clear
    HEADER_BITS = 16
    VERSION_SHIFT = 12
    PROTOCOL_VERSION = 1
    USER_ID_MASK = 0xFFF
    MAX_HEADER_SEGMENTS = 4    # 16 bits in digits of at least 4 bits


# One source with a partial knock: two cache lines, both fetched ahead (see ``defer_digit``).
# Everything a lookup compares (key, port, fingerprint) lies in the first line.
ctypedef struct Slot:
    uint64_t key[2]            # source as IPv6 (IPv4-mapped for IPv4), raw bytes
    int64_t first_us           # packet time of its first digit
    uint16_t nfilled
    uint8_t state
    uint8_t nalt
    uint32_t fp                # low 32 bits of its hash: finds its index entry without rehashing
    uint64_t filled[2]         # one bit per segment (at most 92)
    uint16_t sport             # source port of its packets when grouping by port, else 0
    uint8_t message[MSG_CAP]   # digits packed MSB-first, digit_bits each
    uint8_t alt_segment[N_ALT]
    uint16_t alt_digit[N_ALT]
    uint8_t _tail[6]

# Layout of one record of capture_spec.COMPLETION_DTYPE (aligned numpy struct).
ctypedef struct Completion:
    uint8_t kind
    uint8_t family
    uint8_t length
    uint8_t n_alternatives
    uint32_t usec
    int64_t sec
    uint8_t source[16]
    uint8_t destination[16]
    uint8_t message[MSG_CAP]
    uint8_t alt_segment[N_ALT]
    uint16_t alt_digit[N_ALT]

# Layout of one record of capture_spec.FAILED_KNOCK_DTYPE: a knock that failed before
# judging, with its source (``failed_knocks()``).
ctypedef struct FailedKnock:
    uint8_t reason
    uint8_t family
    uint8_t filled
    uint8_t alternatives
    uint16_t sport
    uint16_t segments
    int64_t first_sec
    uint8_t source[16]

# A knock digit between parsing and table work (see ``defer_digit``): one cache line,
# filled with whole words (addresses as the keys' raw bytes, IPv4-mapped for IPv4).
ctypedef struct Digit:
    uint64_t src[2]
    uint64_t dst[2]
    uint64_t hash
    int64_t sec
    uint32_t usec
    uint16_t sport
    uint8_t segment            # < 92
    uint8_t fam
    uint16_t digit             # < 2^12

ctypedef struct Engine:
    # settings
    int linktype
    int fast_ip_offset          # knock4_fast: where IP starts on this link type; -1: no fast path
    int fast_ethertype_offset   # and where its ethertype lies; -1: none (raw IP)
    uint32_t base_port
    uint32_t digit_bits
    uint32_t segment_size
    uint32_t range_end          # one past the last knock port
    uint32_t spa_port
    uint32_t nseg[2]            # digits of an IPv4 / IPv6 message
    uint32_t pad_mask[2]        # pad bits of the last digit, IPv4 / IPv6
    uint32_t msg_len[2]
    int64_t timeout_us
    uint32_t ndest
    uint8_t dest[MAX_DESTINATIONS][16]
    uint32_t ndest4             # the IPv4 ones among them, as the 4 raw bytes (fast path)
    uint32_t dest4[MAX_DESTINATIONS]
    uint64_t seed[3]            # seed[2] is odd: it weighs the source port into the hash
    bint by_port                # group digits by source address and port (else address)
    # admission: refused before Python, needing no key (docs/capture.md, Admission)
    bint knock_on
    bint spa_on
    bint check_header           # else any header is admitted
    uint32_t header_segments    # the first segments, which hold the header's bits
    uint64_t user_bits[64]      # one bit per configured user id (4096)
    # table
    Slot *slots
    uint64_t *index             # (32-bit hash << 32) | (slot + 1); 0 = empty
    uint64_t index_mask
    uint32_t capacity
    uint32_t next_slot
    uint32_t active
    # completions
    Completion *ring
    uint32_t ring_capacity
    uint32_t ring_count
    # failed knocks, reported with their source (sweep(), refusals of whole knocks)
    FailedKnock *failed
    uint32_t failed_count
    uint32_t sweep_pos          # the slot the next sweep() starts at
    # accounting
    uint64_t counters[N_COUNTERS]
    Digit pipe[PIPE_SIZE]       # digits parsed, their table work not yet done (defer_digit)
    uint32_t pipe_head          # the oldest
    uint32_t pipe_count
    int error
    pcap.pcap_t *handle


cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint64_t fmix64(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


cdef inline uint64_t hash_key(const Engine *e, const uint64_t *key, uint16_t sport) noexcept nogil:
    # Seeded at start-up so that spoofers cannot aim their sources at one probe chain. The
    # port goes in through a secret odd factor, not by XOR into the address (which would let
    # a spoofer trade address bits for port bits and collide without knowing the seed).
    return fmix64((key[0] ^ e.seed[0]) + fmix64(key[1] ^ e.seed[1]) + sport * e.seed[2])


cdef inline Slot *slot_at(const Engine *e, uint64_t entry) noexcept nogil:
    return &e.slots[<uint32_t>(entry & 0xffffffffULL) - 1]


cdef inline int64_t index_find(const Engine *e, const uint64_t *key, uint16_t sport,
                               uint64_t h) noexcept nogil:
    """Position in the index of the entry of (``key``, ``sport``), or -1."""
    cdef uint64_t fp = h & 0xffffffffULL
    cdef uint64_t i = fp & e.index_mask
    cdef uint64_t entry
    cdef Slot *slot
    while True:
        entry = e.index[i]
        if entry == 0:
            return -1
        if (entry >> 32) == fp:
            slot = slot_at(e, entry)
            if slot.key[0] == key[0] and slot.key[1] == key[1] and slot.sport == sport:
                return <int64_t>i
        i = (i + 1) & e.index_mask


cdef inline void index_insert(Engine *e, uint64_t h, uint32_t slot) noexcept nogil:
    cdef uint64_t fp = h & 0xffffffffULL
    cdef uint64_t i = fp & e.index_mask
    while e.index[i] != 0:
        i = (i + 1) & e.index_mask
    e.index[i] = (fp << 32) | (<uint64_t>slot + 1)


cdef void index_remove_at(Engine *e, uint64_t i) noexcept nogil:
    """Backward-shift deletion: linear probing without tombstones, so probes stay short."""
    cdef uint64_t j = i
    cdef uint64_t entry, home
    while True:
        j = (j + 1) & e.index_mask
        entry = e.index[j]
        if entry == 0:
            e.index[i] = 0
            return
        home = (entry >> 32) & e.index_mask
        # The entry at j may fill the hole at i unless its home lies cyclically in (i, j].
        if i <= j:
            if i < home <= j:
                continue
        elif home > i or home <= j:
            continue
        e.index[i] = entry
        i = j


cdef inline void release_slot(Engine *e, Slot *slot, int64_t pos) noexcept nogil:
    """End a partial knock: remove its index entry (at ``pos``; -1 if none), free its slot."""
    # Callers that just found the entry pass its position: the expiry path rehashes nothing.
    if pos >= 0:
        index_remove_at(e, <uint64_t>pos)
    slot.state = STATE_FREE
    e.active -= 1


cdef inline int64_t index_position_of(const Engine *e, const Slot *slot) noexcept nogil:
    """Position in the index of a partial slot's entry, or -1: the entry holds the slot's
    fingerprint and number, so finding it compares words and reads no other slot's key."""
    cdef uint64_t wanted = (<uint64_t>slot.fp << 32) | (<uint64_t>(slot - e.slots) + 1)
    cdef uint64_t i = slot.fp & e.index_mask
    cdef uint64_t entry
    while True:
        entry = e.index[i]
        if entry == wanted:
            return <int64_t>i
        if entry == 0:
            return -1
        i = (i + 1) & e.index_mask


cdef inline void free_slot(Engine *e, Slot *slot) noexcept nogil:
    # Eviction and completion start from the slot: its kept hash finds the entry.
    release_slot(e, slot, index_position_of(e, slot))


# A table key's first 12 bytes when it holds an IPv4 address (IPv4-mapped IPv6).
cdef const char *IPV4_MAPPED = b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff"


cdef void report_failed(Engine *e, const Slot *slot, uint8_t reason) noexcept nogil:
    """Keep a failed knock's source and digit counts for ``failed_knocks()``, while there is
    room (a full ring drops the report; the counters still count the knock)."""
    if e.failed_count >= FAILED_RING_CAPACITY:
        return
    cdef FailedKnock *f = &e.failed[e.failed_count]
    cdef const uint8_t *key = <const uint8_t *>slot.key
    cdef int fam = 0 if memcmp(key, IPV4_MAPPED, 12) == 0 else 1
    e.failed_count += 1
    f.reason = reason
    f.family = 4 if fam == 0 else 6
    f.filled = <uint8_t>slot.nfilled
    f.alternatives = slot.nalt
    f.sport = slot.sport
    f.segments = <uint16_t>e.nseg[fam]
    f.first_sec = slot.first_us // 1000000
    memcpy(f.source, key, 16)


cdef uint32_t sweep_slots(Engine *e, int64_t now_us) noexcept nogil:
    """Free the partial knocks older than the timeout among the next ``SWEEP_SLOTS`` slots
    (reporting those with at least ``MIN_REPORTED_DIGITS`` digits); how many were freed.
    Without it a partial knock waits in its slot until the ring hands the slot out again,
    which on a quiet host may be never, and its failure goes unseen."""
    cdef uint32_t n, freed = 0
    cdef uint32_t budget = SWEEP_SLOTS if SWEEP_SLOTS < e.capacity else e.capacity
    cdef Slot *slot
    for n in range(budget):
        slot = &e.slots[e.sweep_pos]
        e.sweep_pos = e.sweep_pos + 1 if e.sweep_pos + 1 < e.capacity else 0
        if slot.state == STATE_PARTIAL and now_us - slot.first_us > e.timeout_us:
            if slot.nfilled >= MIN_REPORTED_DIGITS:
                report_failed(e, slot, FAILED_TIMED_OUT)
            free_slot(e, slot)
            e.counters[C_EXPIRED] += 1
            freed += 1
    return freed


cdef inline void prefetch_victims(const Engine *e) noexcept nogil:
    # Under a flood every packet takes the next slot of the ring and frees its occupant's
    # index entry. Fetch the slot after next now, and the index entry of the next victim
    # (whose slot was fetched one allocation ago), so neither is a cache miss when needed.
    cdef uint32_t after_next = e.next_slot + 1 if e.next_slot + 1 < e.capacity else 0
    cdef const Slot *victim = &e.slots[e.next_slot]
    KF_PREFETCH(&e.slots[after_next])
    KF_PREFETCH((<const char *>&e.slots[after_next]) + 64)
    if victim.state != STATE_FREE:
        KF_PREFETCH(&e.index[victim.fp & e.index_mask])


cdef inline void put_digit(uint8_t *message, uint32_t bit, uint32_t bits, uint32_t digit) noexcept nogil:
    # A digit of at most 12 bits starting at any bit fits in a 24-bit window.
    cdef uint32_t byte = bit >> 3
    cdef uint32_t window = digit << (24 - (bit & 7) - bits)
    message[byte] |= <uint8_t>(window >> 16)
    message[byte + 1] |= <uint8_t>(window >> 8)
    message[byte + 2] |= <uint8_t>window


cdef inline uint32_t get_digit(const uint8_t *message, uint32_t bit, uint32_t bits) noexcept nogil:
    cdef uint32_t byte = bit >> 3
    cdef uint32_t window = (<uint32_t>message[byte] << 16) | (<uint32_t>message[byte + 1] << 8) | message[byte + 2]
    return (window >> (24 - (bit & 7) - bits)) & ((1u << bits) - 1)


# -- invariants, checked in the debug build only (``if KF_DEBUG:``)

cdef inline bint slot_consistent(const Slot *slot, uint32_t nseg) noexcept nogil:
    """Its digit count is its bitmap's, no bit lies past ``nseg`` segments, alternatives fit."""
    cdef uint64_t past0 = 0, past1  # bits of filled[0], filled[1] for segments >= nseg
    if nseg < 64:
        past0 = slot.filled[0] >> nseg
        past1 = slot.filled[1]
    else:  # nseg <= 92
        past1 = slot.filled[1] >> (nseg - 64)
    return (past0 | past1) == 0 and slot.nalt <= N_ALT \
        and slot.nfilled == KF_POPCOUNT64(slot.filled[0]) + KF_POPCOUNT64(slot.filled[1])


cdef inline int key_family(const uint64_t *key) noexcept nogil:
    """0 for an IPv4-mapped key, else 1 (the engine's family index)."""
    cdef const uint8_t *k = <const uint8_t *>key
    cdef int i
    for i in range(10):
        if k[i] != 0:
            return 1
    return 0 if k[10] == 0xFF and k[11] == 0xFF else 1


cdef int table_violation(const Engine *e) noexcept nogil:
    """The first broken invariant of the table and the ring (an ERROR_ code), or ERROR_NONE.

    After a dispatch: every partial slot is consistent and incomplete; there are ``active``
    partial slots and ``active`` index entries; each entry leads (from its home, by probing)
    to a partial slot with its key and fingerprint. O(capacity): the debug build only.
    """
    cdef uint64_t i, entry, h
    cdef uint32_t s, nseg, partial = 0, entries = 0
    cdef const Slot *slot
    if e.ring_count > e.ring_capacity:
        return ERROR_RING_COUNT
    for s in range(e.capacity):
        slot = &e.slots[s]
        if slot.state == STATE_PARTIAL:
            partial += 1
            nseg = e.nseg[key_family(slot.key)]
            # A slot that has every digit completes and is freed in the same call.
            if not slot_consistent(slot, nseg) or slot.nfilled >= nseg:
                return ERROR_SLOT_DIGITS
        elif slot.state != STATE_FREE:
            return ERROR_SLOT_DIGITS
    if partial != e.active:
        return ERROR_ACTIVE_COUNT
    for i in range(e.index_mask + 1):
        entry = e.index[i]
        if entry != 0:
            entries += 1
            s = <uint32_t>(entry & 0xffffffffULL)
            if s == 0 or s > e.capacity:
                return ERROR_INDEX_ENTRY
    # Only now is the index known to have empty entries, which end index_find's probes.
    if entries != e.active:
        return ERROR_ACTIVE_COUNT
    for i in range(e.index_mask + 1):
        entry = e.index[i]
        if entry == 0:
            continue
        slot = slot_at(e, entry)
        h = hash_key(e, slot.key, slot.sport)
        if slot.state != STATE_PARTIAL or (entry >> 32) != slot.fp \
                or slot.fp != <uint32_t>h or index_find(e, slot.key, slot.sport, h) != <int64_t>i \
                or (slot.sport != 0 and not e.by_port):
            return ERROR_INDEX_ENTRY
    return ERROR_NONE


cdef inline void fail(Engine *e, int error) noexcept nogil:
    """Stop the dispatch loop on an internal error: dispatch() raises CaptureError."""
    e.error = error
    pcap.pcap_breakloop(e.handle)


cdef inline bint ring_reserve(Engine *e) noexcept nogil:
    if e.ring_count >= e.ring_capacity:
        # dispatch() never reads more packets than there are free records; this is a bug guard.
        fail(e, ERROR_RING_FULL)
        return False
    return True


cdef inline void emit_spa(Engine *e, const pcap.pcap_pkthdr *h, const uint64_t *src,
                          const uint8_t *dst, int family, const uint8_t *payload,
                          uint32_t length) noexcept nogil:
    if not ring_reserve(e):
        return
    cdef Completion *c = &e.ring[e.ring_count]
    e.ring_count += 1
    memset(c, 0, sizeof(Completion))
    c.kind = KIND_SPA
    c.family = family
    c.length = length
    c.sec = h.ts.tv_sec
    c.usec = h.ts.tv_usec
    memcpy(c.source, src, 16)
    memcpy(c.destination, dst, 16)
    memcpy(c.message, payload, length)
    e.counters[C_COMPLETIONS] += 1


cdef inline bint header_admitted(const Engine *e, uint32_t header) noexcept nogil:
    cdef uint32_t user = header & USER_ID_MASK
    return header >> VERSION_SHIFT == PROTOCOL_VERSION \
        and (e.user_bits[user >> 6] >> (user & 63)) & 1


cdef inline int header_refusal(const Engine *e, uint32_t header) noexcept nogil:
    """The counter refusing one header: version, else user."""
    return C_REFUSED_USER if header >> VERSION_SHIFT == PROTOCOL_VERSION else C_REFUSED_VERSION


@cython.cdivision(True)
cdef int knock_refusal(const Engine *e, const Slot *slot) noexcept nogil:
    """0 when some combination of a completed slot's digits and alternatives in the header
    segments gives an admitted header, else the counter refusing them all. At most 3^4
    combinations of a few shifts each: nothing next to one AES-SIV attempt."""
    cdef uint32_t header = (<uint32_t>slot.message[0] << 8) | slot.message[1]
    if header_admitted(e, header):
        return 0  # the common case: the primary message
    if slot.nalt == 0:
        return header_refusal(e, header)
    cdef uint32_t nseg = e.header_segments, bits = e.digit_bits
    cdef uint32_t options[MAX_HEADER_SEGMENTS][1 + ALT_PER_SEGMENT]
    cdef uint32_t noptions[MAX_HEADER_SEGMENTS]
    cdef uint32_t s, i, combination, rest, total = 1, value
    cdef bint right_version = False
    for s in range(nseg):
        options[s][0] = get_digit(slot.message, s * bits, bits)
        noptions[s] = 1
    for i in range(slot.nalt):
        s = slot.alt_segment[i]
        if s < nseg:
            options[s][noptions[s]] = slot.alt_digit[i]
            noptions[s] += 1
    for s in range(nseg):
        total *= noptions[s]
    for combination in range(total):
        rest = combination
        value = 0
        for s in range(nseg):
            value = (value << bits) | options[s][rest % noptions[s]]
            rest //= noptions[s]
        header = value >> (nseg * bits - HEADER_BITS)
        if header_admitted(e, header):
            return 0
        right_version = right_version or header >> VERSION_SHIFT == PROTOCOL_VERSION
    return C_REFUSED_USER if right_version else C_REFUSED_VERSION


cdef void knock_digit(Engine *e, const Digit *d) noexcept nogil:
    cdef int64_t now = d.sec * 1000000 + d.usec
    cdef const uint64_t *src = d.src
    cdef uint64_t hv = d.hash
    cdef int fam = d.fam
    cdef uint32_t segment = d.segment
    cdef uint32_t digit = d.digit
    cdef int64_t pos = index_find(e, src, d.sport, hv)
    cdef Slot *slot = NULL
    cdef uint32_t s, i, same_segment
    cdef uint32_t bit = segment * e.digit_bits
    cdef uint32_t stored
    cdef int refusal
    cdef Completion *c

    if pos >= 0:
        slot = slot_at(e, e.index[pos])
        if now - slot.first_us > e.timeout_us:
            release_slot(e, slot, pos)
            e.counters[C_EXPIRED] += 1
            slot = NULL
    if slot == NULL:
        # The ring of slots hands them out in order of first packet, so the slot it
        # reuses holds the oldest partial knock: floods evict oldest first.
        s = e.next_slot
        e.next_slot = s + 1 if s + 1 < e.capacity else 0
        slot = &e.slots[s]
        if slot.state != STATE_FREE:
            if now - slot.first_us > e.timeout_us:
                e.counters[C_EXPIRED] += 1
            else:
                e.counters[C_EVICTIONS] += 1
            free_slot(e, slot)
        # Every field is set but the alternatives' arrays, which are read only below nalt
        # (a completion copies just those): a cheaper start than clearing all 128 bytes.
        slot.key[0] = src[0]
        slot.key[1] = src[1]
        slot.first_us = now
        slot.nfilled = 0
        slot.state = STATE_PARTIAL
        slot.nalt = 0
        slot.fp = <uint32_t>hv
        slot.filled[0] = 0
        slot.filled[1] = 0
        slot.sport = d.sport
        memset(slot.message, 0, MSG_CAP)
        e.active += 1
        index_insert(e, hv, s)
        prefetch_victims(e)
        if KF_DEBUG and e.active > e.capacity:
            fail(e, ERROR_ACTIVE_COUNT)
            return

    if not (slot.filled[segment >> 6] >> (segment & 63)) & 1:
        slot.filled[segment >> 6] |= 1ULL << (segment & 63)
        put_digit(slot.message, bit, e.digit_bits, digit)
        slot.nfilled += 1
    else:
        stored = get_digit(slot.message, bit, e.digit_bits)
        if stored == digit:
            e.counters[C_DUPLICATES] += 1
            return
        e.counters[C_CONFLICTS] += 1
        same_segment = 0
        for i in range(slot.nalt):
            if slot.alt_segment[i] == segment:
                if slot.alt_digit[i] == digit:
                    return
                same_segment += 1
        if same_segment >= ALT_PER_SEGMENT or slot.nalt >= N_ALT:
            e.counters[C_ALTERNATIVES_DROPPED] += 1
            return
        slot.alt_segment[slot.nalt] = <uint8_t>segment
        slot.alt_digit[slot.nalt] = <uint16_t>digit
        slot.nalt += 1
        return

    if KF_DEBUG and not slot_consistent(slot, e.nseg[fam]):
        fail(e, ERROR_SLOT_DIGITS)
        return
    if slot.nfilled < e.nseg[fam]:
        return
    if e.check_header:
        refusal = knock_refusal(e, slot)
        if refusal:
            e.counters[refusal] += 1
            report_failed(
                e, slot,
                FAILED_REFUSED_VERSION if refusal == C_REFUSED_VERSION else FAILED_REFUSED_USER)
            free_slot(e, slot)
            return
    if not ring_reserve(e):
        return
    c = &e.ring[e.ring_count]
    e.ring_count += 1
    memset(c, 0, sizeof(Completion))
    c.kind = KIND_KNOCK
    c.family = 4 if fam == 0 else 6
    c.length = e.msg_len[fam]
    c.n_alternatives = slot.nalt
    c.sec = d.sec
    c.usec = d.usec
    memcpy(c.source, slot.key, 16)
    memcpy(c.destination, d.dst, 16)
    memcpy(c.message, slot.message, e.msg_len[fam])
    # The record is zeroed: past nalt, its alternatives stay 0 (the slot's are not cleared).
    memcpy(c.alt_segment, slot.alt_segment, slot.nalt * sizeof(slot.alt_segment[0]))
    memcpy(c.alt_digit, slot.alt_digit, slot.nalt * sizeof(slot.alt_digit[0]))
    e.counters[C_COMPLETIONS] += 1
    free_slot(e, slot)


cdef inline void prefetch_slot(const Engine *e, const Digit *d) noexcept nogil:
    # Its index entry has had a packet's time to arrive: find the slot it leads to and fetch
    # both of its lines, so that knock_digit, packets later, waits for neither. Only a hint:
    # knock_digit looks the source up again, after the table work of the packets before it.
    cdef uint64_t fp = d.hash & 0xffffffffULL
    cdef uint64_t i = fp & e.index_mask
    cdef uint64_t entry = e.index[i]
    while entry != 0:
        if (entry >> 32) == fp:
            KF_PREFETCH(slot_at(e, entry))
            KF_PREFETCH((<const char *>slot_at(e, entry)) + 64)
            return
        i = (i + 1) & e.index_mask
        entry = e.index[i]


cdef inline void work_oldest(Engine *e) noexcept nogil:
    """The table work of the oldest digit in the pipeline, which leaves it."""
    knock_digit(e, &e.pipe[e.pipe_head])
    e.pipe_head = (e.pipe_head + 1) & (PIPE_SIZE - 1)
    e.pipe_count -= 1


cdef inline void flush_pending(Engine *e) noexcept nogil:
    """Do the table work of every digit in the pipeline, oldest first."""
    while e.pipe_count:
        work_oldest(e)


cdef inline Digit *next_digit(Engine *e) noexcept nogil:
    """The pipeline's free entry after its newest: the parsers fill it in place, and
    ``defer_digit`` adds it. PIPE_SIZE > WORK_AGE, so it is free even when the pipeline is
    full, and the table work ``defer_digit`` does first (on other entries) leaves it alone."""
    return &e.pipe[(e.pipe_head + e.pipe_count) & (PIPE_SIZE - 1)]


cdef inline void set_digit(Digit *d, const uint64_t *src, const uint64_t *dst, uint16_t sport,
                           int fam, uint32_t segment, uint32_t digit) noexcept nogil:
    d.src[0] = src[0]
    d.src[1] = src[1]
    d.dst[0] = dst[0]
    d.dst[1] = dst[1]
    d.sport = sport
    d.segment = <uint8_t>segment
    d.fam = <uint8_t>fam
    d.digit = <uint16_t>digit


cdef inline void defer_digit(Engine *e, const pcap.pcap_pkthdr *h) noexcept nogil:
    """Add the digit a parser wrote into ``next_digit`` to the pipeline."""
    # A pipeline a few packets deep, because a source's state is two dependent random reads
    # (its index entry, then its slot): request this source's index entry now, the slot of
    # the digit SLOT_AGE packets old, and do the table work of the one WORK_AGE packets old.
    # The order of table work is the packets' order; dispatch() flushes at the end of a batch.
    cdef Digit *d = next_digit(e)
    cdef uint64_t hv = hash_key(e, d.src, d.sport)
    KF_PREFETCH(&e.index[hv & e.index_mask])
    d.hash = hv
    d.sec = h.ts.tv_sec
    d.usec = h.ts.tv_usec
    if e.pipe_count == WORK_AGE:
        work_oldest(e)
    e.pipe_count += 1
    if e.pipe_count > SLOT_AGE:
        prefetch_slot(e, &e.pipe[(e.pipe_head + e.pipe_count - 1 - SLOT_AGE) & (PIPE_SIZE - 1)])


cdef inline bint is_vlan(uint16_t ethertype) noexcept nogil:
    return ethertype == ETHERTYPE_VLAN or ethertype == ETHERTYPE_QINQ \
        or ethertype == ETHERTYPE_QINQ_LEGACY


cdef inline uint64_t mapped_low_word(const uint8_t *address) noexcept nogil:
    """Bytes 8-15 of an IPv4 address's 16-byte key (IPv4-mapped: 0, 0, 0xFF, 0xFF, then the
    address); bytes 0-7 are zero."""
    cdef uint8_t raw[8]
    cdef uint64_t word
    raw[0] = 0
    raw[1] = 0
    raw[2] = 0xFF
    raw[3] = 0xFF
    memcpy(raw + 4, address, 4)
    memcpy(&word, raw, 8)
    return word


cdef void on_packet(unsigned char *user, const pcap.pcap_pkthdr *h,
                    const unsigned char *data) noexcept nogil:
    cdef Engine *e = <Engine *>user
    cdef int counter = C_KNOCK_PACKETS
    e.counters[C_PACKETS] += 1
    if e.fast_ip_offset < 0 or not knock4_fast(e, h, data):
        counter = classify(e, h, data)
    if counter == C_KNOCK_PACKETS:  # the parser wrote the digit into next_digit
        defer_digit(e, h)
    e.counters[counter] += 1


cdef inline bint knock4_fast(Engine *e, const pcap.pcap_pkthdr *h, const uint8_t *p) noexcept nogil:
    """The common case, ahead of classify: IPv4 without options (untagged on a link with an
    ethertype), not a fragment, a TCP SYN or a UDP datagram (not SPA) to an admitted digit port.

    Writes the digit into next_digit and returns True exactly when classify would write the
    same digit (and count a knock packet); for anything else it returns False having written
    nothing, and classify (every case, every counter) decides. The checks are classify's, in
    another order, which cannot matter as none of them has a side effect.
    """
    cdef uint32_t caplen = h.caplen
    cdef uint32_t link = <uint32_t>e.fast_ip_offset
    cdef int at = e.fast_ethertype_offset
    cdef const uint8_t *ip = p + link
    cdef const uint8_t *l4 = ip + 20
    cdef uint32_t total, avail, dport, port, segment, digit, i, address
    cdef uint64_t src[2]
    cdef uint64_t dst[2]
    if caplen < link + 20 + 8:  # IPv4 without options and a UDP header: the shortest taken
        return False
    # Ethertype IPv4 (no VLAN tag), then version 4 with a 20-byte header (no options); on raw
    # IP links the version nibble alone decides, as in classify.
    if at >= 0 and (p[at] != 0x08 or p[at + 1] != 0x00):
        return False
    if ip[0] != 0x45:
        return False
    total = be16(ip + 2)
    if total < 20 or be16(ip + 6) & 0x1FFF:
        return False
    avail = caplen - link if caplen - link < total else total  # IPv4 header and transport
    if ip[9] == IPPROTO_TCP:
        if avail < 20 + 20 or (l4[13] & (TCP_SYN | TCP_ACK)) != TCP_SYN:
            return False
    elif ip[9] == IPPROTO_UDP:
        if avail < 20 + 8 or be16(l4 + 2) == e.spa_port:
            return False
    else:
        return False
    if e.ndest:
        memcpy(&address, ip + 16, 4)
        for i in range(e.ndest4):
            if e.dest4[i] == address:
                break
        else:
            return False
    dport = be16(l4 + 2)
    if dport < e.base_port or dport >= e.range_end:
        return False
    port = dport - e.base_port
    segment = port >> e.digit_bits
    digit = port & (e.segment_size - 1)
    if segment >= e.nseg[0] or not e.knock_on:
        return False
    if segment == e.nseg[0] - 1 and (digit & e.pad_mask[0]):
        return False
    src[0] = 0
    src[1] = mapped_low_word(ip + 12)
    dst[0] = 0
    dst[1] = mapped_low_word(ip + 16)
    set_digit(next_digit(e), src, dst, be16(l4) if e.by_port else 0, 0, segment, digit)
    return True


cdef int classify(Engine *e, const pcap.pcap_pkthdr *h, const uint8_t *p) noexcept nogil:
    """Parse one frame; act on an SPA datagram, or write a digit into next_digit; return the
    counter this packet adds to (C_KNOCK_PACKETS for a digit, which on_packet then defers).

    Every read is checked against the captured length by hand (docs/capture.md lists the
    order of checks, which the pure-Python twin follows too).
    """
    cdef uint32_t caplen = h.caplen
    cdef uint32_t off = 0, tags = 0, avail, ihl, total, q, ext, hdr_len
    cdef uint16_t ethertype = 0
    cdef uint8_t proto, next_header, flags
    cdef int fam, i
    cdef uint64_t src[2]
    cdef uint64_t dst[2]
    cdef const uint8_t *ip
    cdef const uint8_t *l4
    cdef uint32_t l4avail, dport, udp_len, payload, segment, digit, port

    # -- link layer
    if e.linktype == LINKTYPE_ETHERNET:
        if caplen < 14:
            return C_MALFORMED
        ethertype = be16(p + 12)
        off = 14
    elif e.linktype == LINKTYPE_LINUX_SLL:
        if caplen < 16:
            return C_MALFORMED
        ethertype = be16(p + 14)
        off = 16
    elif e.linktype == LINKTYPE_LINUX_SLL2:
        if caplen < 20:
            return C_MALFORMED
        ethertype = be16(p)
        off = 20
    elif e.linktype == LINKTYPE_IPV4:
        ethertype = ETHERTYPE_IPV4
    elif e.linktype == LINKTYPE_IPV6:
        ethertype = ETHERTYPE_IPV6
    else:  # raw IP: the version nibble decides
        ethertype = ETHERTYPE_IPV6 if caplen >= 1 and (p[0] >> 4) == 6 else ETHERTYPE_IPV4
    while is_vlan(ethertype):
        if tags == MAX_TAGS or caplen < off + 4:
            return C_MALFORMED
        ethertype = be16(p + off + 2)
        off += 4
        tags += 1

    # -- network layer
    ip = p + off
    avail = caplen - off
    if ethertype == ETHERTYPE_IPV4:
        if avail < 20 or (ip[0] >> 4) != 4:
            return C_MALFORMED
        ihl = (ip[0] & 0x0F) * 4
        total = be16(ip + 2)
        if ihl < 20 or avail < ihl or total < ihl:
            return C_MALFORMED
        if total < avail:
            avail = total
        if be16(ip + 6) & 0x1FFF:
            return C_IGNORED
        fam = 0
        src[0] = 0
        src[1] = mapped_low_word(ip + 12)
        dst[0] = 0
        dst[1] = mapped_low_word(ip + 16)
        proto = ip[9]
        l4 = ip + ihl
        l4avail = avail - ihl
    elif ethertype == ETHERTYPE_IPV6:
        if avail < 40 or (ip[0] >> 4) != 6:
            return C_MALFORMED
        # An IPv4-mapped source would share the IPv4 source's table entry; a mapped
        # destination would make a grant of mixed families (an IPv6 source, an IPv4 address).
        if (be16(ip + 8) | be16(ip + 10) | be16(ip + 12) | be16(ip + 14) | be16(ip + 16)) == 0 \
                and be16(ip + 18) == 0xFFFF:
            return C_MALFORMED
        if (be16(ip + 24) | be16(ip + 26) | be16(ip + 28) | be16(ip + 30) | be16(ip + 32)) == 0 \
                and be16(ip + 34) == 0xFFFF:
            return C_MALFORMED
        avail -= 40
        total = be16(ip + 4)
        if total < avail:
            avail = total
        next_header = ip[6]
        q = 0
        ext = 0
        while next_header != IPPROTO_TCP and next_header != IPPROTO_UDP:
            if next_header == IPPROTO_HOPOPTS or next_header == IPPROTO_ROUTING \
                    or next_header == IPPROTO_DSTOPTS or next_header == IPPROTO_AH:
                if ext == MAX_EXT or q + 2 > avail:
                    return C_MALFORMED
                if next_header == IPPROTO_AH:
                    hdr_len = (<uint32_t>ip[40 + q + 1] + 2) * 4
                else:
                    hdr_len = (<uint32_t>ip[40 + q + 1] + 1) * 8
                if q + hdr_len > avail:
                    return C_MALFORMED
            elif next_header == IPPROTO_FRAGMENT:
                if ext == MAX_EXT or q + 8 > avail:
                    return C_MALFORMED
                if be16(ip + 40 + q + 2) >> 3:
                    return C_IGNORED
                hdr_len = 8
            else:
                return C_IGNORED
            ext += 1
            next_header = ip[40 + q]
            q += hdr_len
        fam = 1
        memcpy(src, ip + 8, 16)
        memcpy(dst, ip + 24, 16)
        proto = next_header
        l4 = ip + 40 + q
        l4avail = avail - q
    else:
        return C_IGNORED

    if e.ndest:
        for i in range(<int>e.ndest):
            if memcmp(dst, e.dest[i], 16) == 0:
                break
        else:
            return C_IGNORED

    # -- transport
    if proto == IPPROTO_TCP:
        if l4avail < 20:
            return C_MALFORMED
        flags = l4[13]
        if (flags & (TCP_SYN | TCP_ACK)) != TCP_SYN:
            return C_IGNORED
        dport = be16(l4 + 2)
    elif proto == IPPROTO_UDP:
        if l4avail < 8:
            return C_MALFORMED
        dport = be16(l4 + 2)
        if dport == e.spa_port:
            if not e.spa_on:
                return C_REFUSED_MODE
            udp_len = be16(l4 + 4)
            if udp_len < 8 or udp_len > l4avail:
                return C_MALFORMED
            payload = udp_len - 8
            if payload != MESSAGE_LEN_4 and payload != MESSAGE_LEN_6:
                return C_MALFORMED
            if e.check_header and not header_admitted(e, be16(l4 + 8)):
                return header_refusal(e, be16(l4 + 8))
            flush_pending(e)  # keep completions in packet order
            emit_spa(e, h, src, <const uint8_t *>dst, 4 if fam == 0 else 6, l4 + 8, payload)
            return C_SPA_PACKETS
    else:
        return C_IGNORED

    if dport < e.base_port or dport >= e.range_end:
        return C_IGNORED
    port = dport - e.base_port
    segment = port >> e.digit_bits
    digit = port & (e.segment_size - 1)
    if segment >= e.nseg[fam]:
        return C_IGNORED
    if not e.knock_on:
        return C_REFUSED_MODE
    if segment == e.nseg[fam] - 1 and (digit & e.pad_mask[fam]):
        return C_MALFORMED
    # Both transports carry the source port in their first two bytes (checked above).
    set_digit(next_digit(e), src, dst, be16(l4) if e.by_port else 0, fam, segment, digit)
    return C_KNOCK_PACKETS  # on_packet defers it


cdef void count_only(unsigned char *user, const pcap.pcap_pkthdr *h,
                     const unsigned char *data) noexcept nogil:
    (<uint64_t *>user)[0] += 1


cdef double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def bare_dispatch(path):
    """The capture limit: pcap_dispatch over a file with a callback that only counts.

    Returns (packets, seconds), timing the dispatch loop alone, for bench/run.py.
    """
    cdef char errbuf[pcap.PCAP_ERRBUF_SIZE]
    cdef bytes fname = os.fsencode(path)
    cdef pcap.pcap_t *handle = pcap.pcap_open_offline(fname, errbuf)
    cdef uint64_t packets = 0
    cdef int rc = 1
    cdef double start, stop
    if handle == NULL:
        raise CaptureError(f"cannot open capture file {path}: {errbuf.decode(errors='replace')}")
    try:
        with nogil:
            start = monotonic()
            while rc > 0:
                rc = pcap.pcap_dispatch(handle, -1, count_only, <unsigned char *>&packets)
            stop = monotonic()
        if rc < 0:
            raise CaptureError(f"{path}: {pcap.pcap_geterr(handle).decode(errors='replace')}")
    finally:
        pcap.pcap_close(handle)
    return packets, stop - start


_INTERNAL_ERRORS = {
    ERROR_RING_FULL: "completion ring overflow",
    ERROR_ACTIVE_COUNT: "active sources disagree with the slots or the index",
    ERROR_INDEX_ENTRY: "an index entry does not lead to its partial slot",
    ERROR_SLOT_DIGITS: "a slot's digit count disagrees with its bitmap",
    ERROR_RING_COUNT: "more completions than ring records",
}


def _address_key(address):
    return spec.address_key(ipaddress.ip_address(address))


cdef class CaptureEngine:
    """Knock capture over one pcap handle (docs/capture.md has the API and the rules)."""

    cdef Engine e
    cdef object layout
    cdef object destinations
    cdef cnp.ndarray _slots
    cdef cnp.ndarray _index
    cdef cnp.ndarray _ring
    cdef cnp.ndarray _failed
    cdef readonly double knock_timeout
    cdef readonly object group_by
    cdef readonly object admission
    cdef readonly bint live
    cdef bint bpf

    def __cinit__(self):
        memset(&self.e, 0, sizeof(Engine))

    def __init__(self, layout, knock_timeout=10.0, capacity=65536, ring_capacity=4096,
                 destinations=(), group_by=spec.GROUP_BY_ADDRESS_AND_PORT, knock_mode=True,
                 spa_mode=True, user_ids=None):
        # The twin calls the same checker: same errors, same normalised numbers.
        settings = spec.engine_settings(layout, knock_timeout, capacity, ring_capacity,
                                        destinations, group_by, knock_mode, spa_mode, user_ids)
        self.group_by = group_by
        capacity = settings.capacity
        ring_capacity = settings.ring_capacity
        self.layout = layout
        self.destinations = settings.destinations
        self.knock_timeout = settings.knock_timeout

        cdef Engine *e = &self.e
        e.base_port = layout.base_port
        e.digit_bits = layout.digit_bits
        e.segment_size = layout.segment_size
        e.range_end = settings.knock_end
        e.spa_port = layout.spa_port
        for fam in range(2):
            e.nseg[fam] = settings.segments[fam]
            e.msg_len[fam] = settings.message_lengths[fam]
            e.pad_mask[fam] = settings.pad_masks[fam]
        e.timeout_us = settings.knock_timeout_us
        cdef bytes dest_key
        for i, dest_key in enumerate(settings.destination_keys):
            memcpy(e.dest[i], <const char *>dest_key, 16)
        e.ndest = len(settings.destination_keys)
        for dest_key in settings.destination_keys:
            if dest_key[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped: an IPv4 destination
                memcpy(&e.dest4[e.ndest4], <const char *>dest_key + 12, 4)
                e.ndest4 += 1
        e.seed[0] = int.from_bytes(os.urandom(8), "little")
        e.seed[1] = int.from_bytes(os.urandom(8), "little")
        e.seed[2] = int.from_bytes(os.urandom(8), "little") | 1
        e.by_port = settings.by_port
        e.header_segments = settings.header_segments
        self._set_admission(settings.admission)

        # Allocated once; the callback only ever sees these raw pointers.
        index_size = 1 << max(4, (2 * capacity - 1).bit_length())
        self._slots = np.zeros(capacity * sizeof(Slot) + 128, dtype=np.uint8)
        cdef size_t address = <size_t>cnp.PyArray_DATA(self._slots)
        e.slots = <Slot *>((address + 127) & ~(<size_t>127))  # one slot = two whole cache lines
        self._index = np.zeros(index_size, dtype=np.uint64)
        e.index = <uint64_t *>cnp.PyArray_DATA(self._index)
        e.index_mask = index_size - 1
        e.capacity = capacity
        self._ring = np.zeros(ring_capacity, dtype=spec.COMPLETION_DTYPE)
        e.ring = <Completion *>cnp.PyArray_DATA(self._ring)
        e.ring_capacity = ring_capacity
        self._failed = np.zeros(FAILED_RING_CAPACITY, dtype=spec.FAILED_KNOCK_DTYPE)
        e.failed = <FailedKnock *>cnp.PyArray_DATA(self._failed)

    cdef _set_admission(self, admission):
        cdef Engine *e = &self.e
        self.admission = admission
        e.knock_on = admission.knock_mode
        e.spa_on = admission.spa_mode
        e.check_header = admission.user_ids is not None
        memset(e.user_bits, 0, sizeof(e.user_bits))
        for user in admission.user_ids or ():
            e.user_bits[user >> 6] |= 1ULL << (user & 63)

    def admit(self, knock_mode=True, spa_mode=True, user_ids=None):
        """Change what is refused before judging (a reload: modes and users); a live handle
        opened with BPF gets the filter for the new modes."""
        admission = spec.admission(knock_mode, spa_mode, user_ids)
        if self.e.handle != NULL and self.bpf:
            self._set_filter(self.e.handle, admission, self.e.linktype)
        self._set_admission(admission)

    def __dealloc__(self):
        if self.e.handle != NULL:
            pcap.pcap_close(self.e.handle)
            self.e.handle = NULL

    # -- opening

    def open_file(self, path, bpf=False):
        """Read a pcap or pcapng file (libpcap's pcap_open_offline)."""
        cdef char errbuf[pcap.PCAP_ERRBUF_SIZE]
        cdef bytes fname = os.fsencode(path)
        self.close()
        errbuf[0] = 0
        cdef pcap.pcap_t *handle = pcap.pcap_open_offline(fname, errbuf)
        if handle == NULL:
            raise CaptureError(f"cannot open capture file {path}: {errbuf.decode(errors='replace')}")
        self._adopt(handle, bpf, f"capture file {path}")
        self.live = False

    def open_live(self, interface, buffer_bytes=32 << 20, timeout_ms=spec.BLOCK_TIMEOUT_MS,
                  snaplen=spec.SNAPLEN, bpf=True, immediate=False):
        """Capture on an interface (``any`` for all), not promiscuous.

        By default libpcap uses TPACKET_V3: packets are packed into the kernel's blocks at
        their own length (a SYN takes ~100 bytes, so 32 MiB holds ~300k) and the descriptor
        becomes readable when a block fills or ``timeout_ms`` after its first packet: one
        wakeup per batch, at most ``timeout_ms`` of added latency. ``immediate`` wakes for
        every packet and stores each in a fixed slot sized for the snaplen (~600 bytes:
        32 MiB holds ~50k packets): fine for tests, costly under load.
        """
        cdef char errbuf[pcap.PCAP_ERRBUF_SIZE]
        cdef bytes name = os.fsencode(interface)
        self.close()
        errbuf[0] = 0
        cdef pcap.pcap_t *handle = pcap.pcap_create(name, errbuf)
        if handle == NULL:
            raise CaptureError(f"interface {interface}: {errbuf.decode(errors='replace')}")
        pcap.pcap_set_snaplen(handle, snaplen)
        pcap.pcap_set_promisc(handle, 0)
        pcap.pcap_set_immediate_mode(handle, 1 if immediate else 0)
        pcap.pcap_set_buffer_size(handle, buffer_bytes)
        pcap.pcap_set_timeout(handle, timeout_ms)
        rc = pcap.pcap_activate(handle)
        if rc < 0:
            detail = pcap.pcap_geterr(handle).decode(errors="replace")
            pcap.pcap_close(handle)
            if rc == pcap.PCAP_ERROR_NO_SUCH_DEVICE:
                raise CaptureError(f"interface {interface}: no such interface")
            if rc == pcap.PCAP_ERROR_PERM_DENIED:
                raise CaptureError(f"interface {interface}: permission denied (needs CAP_NET_RAW)")
            status = pcap.pcap_statustostr(rc).decode(errors="replace")
            raise CaptureError(f"interface {interface}: {status}: {detail}")
        self._adopt(handle, bpf, f"interface {interface}")
        self.live = True

    cdef _adopt(self, pcap.pcap_t *handle, bint bpf, str what):
        linktype = pcap.pcap_datalink(handle)
        if linktype not in spec.SUPPORTED_LINKTYPES:
            pcap.pcap_close(handle)
            raise CaptureError(f"{what}: unsupported link type {linktype}")
        if bpf:
            try:
                self._set_filter(handle, self.admission, linktype)
            except CaptureError as error:
                pcap.pcap_close(handle)
                raise CaptureError(f"{what}: {error}") from None
        self.e.handle = handle
        self.e.linktype = linktype
        # knock4_fast's offsets (classify's link layer); IPv6-only links never take it.
        self.e.fast_ip_offset, self.e.fast_ethertype_offset = {
            LINKTYPE_ETHERNET: (14, 12),
            LINKTYPE_LINUX_SLL: (16, 14),
            LINKTYPE_LINUX_SLL2: (20, 0),
            LINKTYPE_IPV6: (-1, -1),
        }.get(linktype, (0, -1))  # IPv4 and raw IP: no link header, no ethertype
        self.bpf = bpf

    cdef _set_filter(self, pcap.pcap_t *handle, admission, int linktype):
        cdef pcap.bpf_program program
        text = spec.filter_expression(self.layout, self.destinations, linktype,
                                      admission.knock_mode, admission.spa_mode).encode()
        if pcap.pcap_compile(handle, &program, text, 1, pcap.PCAP_NETMASK_UNKNOWN) != 0:
            raise CaptureError(f"BPF filter: {pcap.pcap_geterr(handle).decode(errors='replace')}")
        rc = pcap.pcap_setfilter(handle, &program)
        pcap.pcap_freecode(&program)
        if rc != 0:
            raise CaptureError(f"BPF filter: {pcap.pcap_geterr(handle).decode(errors='replace')}")

    @property
    def filter_expression(self):
        """The BPF source for the open handle's link type (Ethernet if none is open)."""
        return spec.filter_expression(
            self.layout, self.destinations, self.e.linktype or spec.LINKTYPE_ETHERNET,
            self.admission.knock_mode, self.admission.spa_mode,
        )

    @property
    def linktype(self):
        return self.e.linktype if self.e.handle != NULL else None

    def fileno(self):
        """A descriptor to wait on with select/poll before dispatch (live handles)."""
        self._require_handle()
        return pcap.pcap_get_selectable_fd(self.e.handle)

    def set_nonblocking(self, flag=True):
        cdef char errbuf[pcap.PCAP_ERRBUF_SIZE]
        self._require_handle()
        if pcap.pcap_setnonblock(self.e.handle, 1 if flag else 0, errbuf) < 0:
            raise CaptureError(errbuf.decode(errors="replace"))

    def close(self):
        if self.e.handle != NULL:
            pcap.pcap_close(self.e.handle)
            self.e.handle = NULL

    def _require_handle(self):
        if self.e.handle == NULL:
            raise CaptureError("no capture is open: call open_file() or open_live() first")

    # -- the loop

    def dispatch(self, int max_packets=-1):
        """Read one batch (at most the free completion records); the GIL is released."""
        cdef int rc, count
        self._require_handle()
        free = self.e.ring_capacity - self.e.ring_count
        if free == 0:
            raise CaptureError("completion ring full: drain() before dispatch()")
        count = free if max_packets <= 0 or max_packets > free else max_packets
        self.e.error = ERROR_NONE
        with nogil:
            rc = pcap.pcap_dispatch(self.e.handle, count, on_packet, <unsigned char *>&self.e)
            flush_pending(&self.e)
            if KF_DEBUG and self.e.error == ERROR_NONE:  # a whole-table scan per batch
                self.e.error = table_violation(&self.e)
        if self.e.error != ERROR_NONE:
            raise CaptureError(f"internal error: {_INTERNAL_ERRORS[self.e.error]}")
        if rc == pcap.PCAP_ERROR_BREAK:
            return 0
        if rc < 0:
            raise CaptureError(pcap.pcap_geterr(self.e.handle).decode(errors="replace"))
        return rc

    def drain(self):
        """The completions since the last drain, oldest first (a copy), and an empty ring."""
        count = self.e.ring_count
        self.e.ring_count = 0
        return self._ring[:count].copy()

    def sweep(self, now):
        """Free the partial knocks that timed out by ``now`` (seconds, as packet times) among
        the next ``capture_spec.SWEEP_SLOTS`` slots; how many (counted in ``expired``).
        Call it between dispatches, every few seconds: ``failed_knocks()`` reports them."""
        cdef int64_t now_us = spec.time_us(now)
        cdef uint32_t freed
        with nogil:
            freed = sweep_slots(&self.e, now_us)
        return freed

    def failed_knocks(self):
        """The failed knocks reported since the last call, oldest first (a copy): records of
        ``capture_spec.FAILED_KNOCK_DTYPE``, at most ``FAILED_RING_CAPACITY``."""
        count = self.e.failed_count
        self.e.failed_count = 0
        return self._failed[:count].copy()

    def forget(self, address, port=0):
        """Drop the partial knock of ``address`` (from source ``port`` when grouping by
        port), if any (the daemon's one way back in)."""
        cdef bytes key = _address_key(address)
        cdef uint64_t k[2]
        cdef uint16_t sport = port if self.e.by_port else 0
        memcpy(k, <const char *>key, 16)
        cdef int64_t pos = index_find(&self.e, k, sport, hash_key(&self.e, k, sport))
        if pos >= 0:
            release_slot(&self.e, slot_at(&self.e, self.e.index[pos]), pos)

    def active_sources(self):
        return self.e.active

    def stats(self):
        cdef pcap.pcap_stat ps
        result = {name: self.e.counters[i] for i, name in enumerate(spec.COUNTER_NAMES)}
        result.update(dict.fromkeys(spec.PCAP_COUNTER_NAMES, 0))
        if self.live and self.e.handle != NULL and pcap.pcap_stats(self.e.handle, &ps) == 0:
            result["pcap_received"] = ps.ps_recv
            result["pcap_dropped"] = ps.ps_drop
            result["pcap_ifdropped"] = ps.ps_ifdrop
        return result


def debug_build() -> bool:
    """True for a ``make debug`` build (KNOCKD_FAST_DEBUG=1): -O0 -g, line tracing, and the
    table's invariants checked after every dispatch (a violation raises CaptureError)."""
    return bool(KF_DEBUG)


def libpcap_version() -> str:
    """Return libpcap's own version string, e.g. 'libpcap version 1.10.3 (with TPACKET_V3)'."""
    return pcap.pcap_lib_version().decode("ascii", "replace")


def _check_layouts():
    # The C structs and the shared numbers must agree with capture_spec.
    assert sizeof(Slot) == 128, sizeof(Slot)
    assert sizeof(Completion) == spec.COMPLETION_DTYPE.itemsize
    assert sizeof(FailedKnock) == spec.FAILED_KNOCK_DTYPE.itemsize
    assert (FAILED_TIMED_OUT, FAILED_REFUSED_VERSION, FAILED_REFUSED_USER) == (
        spec.FAILED_TIMED_OUT, spec.FAILED_REFUSED_VERSION, spec.FAILED_REFUSED_USER)
    assert (FAILED_RING_CAPACITY, MIN_REPORTED_DIGITS, SWEEP_SLOTS) == (
        spec.FAILED_RING_CAPACITY, spec.MIN_REPORTED_DIGITS, spec.SWEEP_SLOTS)
    assert (N_ALT, ALT_PER_SEGMENT, MSG_CAP, MAX_TAGS, MAX_EXT, MAX_DESTINATIONS) == (
        spec.MAX_ALTERNATIVES, spec.ALTERNATIVES_PER_SEGMENT, spec.MESSAGE_CAPACITY,
        spec.MAX_VLAN_TAGS, spec.MAX_IPV6_EXTENSION_HEADERS, spec.MAX_DESTINATIONS)
    assert (MESSAGE_LEN_4, MESSAGE_LEN_6) == (MESSAGE_LEN_IPV4, MESSAGE_LEN_IPV6)
    c_numbers = {
        "LINKTYPE_ETHERNET": LINKTYPE_ETHERNET,
        "LINKTYPE_LINUX_SLL": LINKTYPE_LINUX_SLL,
        "LINKTYPE_LINUX_SLL2": LINKTYPE_LINUX_SLL2,
        "LINKTYPE_IPV4": LINKTYPE_IPV4,
        "LINKTYPE_IPV6": LINKTYPE_IPV6,
        "ETHERTYPE_IPV4": ETHERTYPE_IPV4,
        "ETHERTYPE_IPV6": ETHERTYPE_IPV6,
        "ETHERTYPE_VLAN": ETHERTYPE_VLAN,
        "ETHERTYPE_QINQ": ETHERTYPE_QINQ,
        "ETHERTYPE_QINQ_LEGACY": ETHERTYPE_QINQ_LEGACY,
        "IPPROTO_HOPOPTS": IPPROTO_HOPOPTS,
        "IPPROTO_TCP": IPPROTO_TCP,
        "IPPROTO_UDP": IPPROTO_UDP,
        "IPPROTO_ROUTING": IPPROTO_ROUTING,
        "IPPROTO_FRAGMENT": IPPROTO_FRAGMENT,
        "IPPROTO_AH": IPPROTO_AH,
        "IPPROTO_DSTOPTS": IPPROTO_DSTOPTS,
        "TCP_SYN": TCP_SYN,
        "TCP_ACK": TCP_ACK,
        "KIND_KNOCK": KIND_KNOCK,
        "KIND_SPA": KIND_SPA,
    }
    for name, value in c_numbers.items():
        assert getattr(spec, name) == value, name
    # The sets the C code spells out test by test (is_vlan, the extension header walk).
    assert spec.VLAN_TPIDS == (ETHERTYPE_VLAN, ETHERTYPE_QINQ, ETHERTYPE_QINQ_LEGACY)
    assert spec.IPV6_EXTENSION_HEADERS == (
        IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH, IPPROTO_DSTOPTS)
    # classify() reads every supported link type without a branch of its own as raw IP.
    assert spec.SUPPORTED_LINKTYPES - {
        LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_IPV4, LINKTYPE_IPV6
    } == {spec.LINKTYPE_RAW_DLT12, spec.LINKTYPE_RAW_DLT14, spec.LINKTYPE_RAW}
    assert tuple(spec.COUNTER_NAMES) == (
        "packets", "knock_packets", "spa_packets", "completions", "duplicates", "conflicts",
        "alternatives_dropped", "evictions", "expired", "malformed", "ignored",
        "refused_mode", "refused_version", "refused_user")
    assert N_COUNTERS == len(spec.COUNTER_NAMES)
    assert (HEADER_BITS, VERSION_SHIFT, PROTOCOL_VERSION, USER_ID_MASK) == (
        spec.HEADER_BITS, spec.VERSION_SHIFT, spec.VERSION, spec.MAX_USER_ID)
    assert MAX_HEADER_SEGMENTS == spec.MAX_HEADER_SEGMENTS


_check_layouts()
