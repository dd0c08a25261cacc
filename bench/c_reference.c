/* The floor for the engine: a minimal hand-written C knock collector over a capture file.
 *
 * `make bench` builds it (bench/run.py, engine "c-reference") and runs it beside the bare
 * loop and the Cython engine over the same file, so that "x bare" has a second reference:
 * what a C hot path that does only the essential work costs. It reads IPv4 TCP SYNs on
 * Ethernet into an open-addressing table of 2^16 64-byte slots (one cache line each) keyed
 * by source address and port, with the default layout (base 20000, 8-bit digits, 34
 * segments), and counts whole messages. It has none of the engine's other duties: no IPv6,
 * VLANs, UDP or SPA, no alternatives, no oldest-first eviction (a full probe window
 * overwrites its home slot), no expiry order, no completion records, no admission.
 *
 * Usage: c_reference FILE  ->  prints "packets seconds knock_packets completions evictions".
 * Only the dispatch loop is timed, as in _capture_c.bare_dispatch.
 */
#include <pcap/pcap.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define BASE_PORT 20000u
#define DIGIT_BITS 8u
#define SEGMENTS 34u
#define TABLE_BITS 16
#define TABLE_MASK ((1u << TABLE_BITS) - 1)
#define PROBES 8
#define TIMEOUT_US 10000000LL

typedef struct {
    uint32_t address;
    uint16_t sport;
    uint8_t nfilled;
    uint8_t used;
    int64_t first_us;
    uint64_t filled;
    uint8_t message[40];
} slot_t;

_Static_assert(sizeof(slot_t) == 64, "one slot, one cache line");

typedef struct {
    slot_t *table;
    uint64_t seed;
    uint64_t packets, knock_packets, completions, evictions;
} state_t;

static inline uint64_t fmix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static void on_packet(u_char *user, const struct pcap_pkthdr *h, const u_char *p) {
    state_t *s = (state_t *)user;
    s->packets++;
    if (h->caplen < 14 + 20 || p[12] != 0x08 || p[13] != 0x00) return;
    const u_char *ip = p + 14;
    uint32_t ihl = (ip[0] & 15u) * 4;
    if ((ip[0] >> 4) != 4 || ihl < 20 || ip[9] != 6 || h->caplen < 14 + ihl + 20) return;
    const u_char *tcp = ip + ihl;
    if ((tcp[13] & 0x12) != 0x02) return;
    uint32_t dport = ((uint32_t)tcp[2] << 8) | tcp[3];
    if (dport < BASE_PORT) return;
    uint32_t segment = (dport - BASE_PORT) >> DIGIT_BITS;
    uint32_t digit = (dport - BASE_PORT) & ((1u << DIGIT_BITS) - 1);
    if (segment >= SEGMENTS) return;
    s->knock_packets++;

    uint32_t address;
    memcpy(&address, ip + 12, 4);
    uint16_t sport = (uint16_t)(((uint32_t)tcp[0] << 8) | tcp[1]);
    int64_t now = (int64_t)h->ts.tv_sec * 1000000 + h->ts.tv_usec;
    uint64_t hash = fmix64(((uint64_t)address << 16 | sport) ^ s->seed);
    uint32_t home = (uint32_t)hash & TABLE_MASK;
    slot_t *slot = NULL, *spare = NULL;
    for (uint32_t i = 0; i < PROBES; i++) {
        slot_t *candidate = &s->table[(home + i) & TABLE_MASK];
        if (candidate->used && now - candidate->first_us <= TIMEOUT_US) {
            if (candidate->address == address && candidate->sport == sport) {
                slot = candidate;
                break;
            }
        } else if (spare == NULL) {
            spare = candidate;
        }
    }
    if (slot == NULL) {
        if (spare == NULL) {
            spare = &s->table[home];
            s->evictions++;
        }
        slot = spare;
        memset(slot, 0, sizeof *slot);
        slot->address = address;
        slot->sport = sport;
        slot->used = 1;
        slot->first_us = now;
    }
    if ((slot->filled >> segment) & 1) return;  /* a repeated digit: the first one stays */
    slot->filled |= 1ULL << segment;
    slot->message[segment] = (uint8_t)digit;  /* 8-bit digits: a byte each */
    if (++slot->nfilled == SEGMENTS) {
        s->completions++;
        slot->used = 0;
    }
}

int main(int argc, char **argv) {
    static slot_t table[1u << TABLE_BITS] __attribute__((aligned(64)));
    char errbuf[PCAP_ERRBUF_SIZE];
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE\n", argv[0]);
        return 2;
    }
    pcap_t *handle = pcap_open_offline(argv[1], errbuf);
    if (handle == NULL) {
        fprintf(stderr, "c_reference: %s\n", errbuf);
        return 1;
    }
    state_t s = {table, 0x9e3779b97f4a7c15ULL, 0, 0, 0, 0};
    memset(table, 0, sizeof table);  /* touch the pages before the clock starts */
    struct timespec start, stop;
    int rc = 1;
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (rc > 0) rc = pcap_dispatch(handle, -1, on_packet, (u_char *)&s);
    clock_gettime(CLOCK_MONOTONIC, &stop);
    if (rc < 0) {
        fprintf(stderr, "c_reference: %s\n", pcap_geterr(handle));
        return 1;
    }
    pcap_close(handle);
    printf("%llu %.9f %llu %llu %llu\n", (unsigned long long)s.packets,
           (double)(stop.tv_sec - start.tv_sec) + (stop.tv_nsec - start.tv_nsec) / 1e9,
           (unsigned long long)s.knock_packets, (unsigned long long)s.completions,
           (unsigned long long)s.evictions);
    return 0;
}
