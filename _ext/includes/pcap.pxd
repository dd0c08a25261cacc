# Declarations from <pcap/pcap.h>: only what _ext/*.pyx actually uses.

from posix.time cimport timeval


cdef extern from "pcap/pcap.h" nogil:
    ctypedef struct pcap_t:
        pass
    ctypedef unsigned int bpf_u_int32

    struct pcap_pkthdr:
        timeval ts
        bpf_u_int32 caplen
        bpf_u_int32 len

    struct bpf_program:
        unsigned int bf_len
        void *bf_insns

    struct pcap_stat:
        unsigned int ps_recv
        unsigned int ps_drop
        unsigned int ps_ifdrop

    ctypedef void (*pcap_handler)(unsigned char *user, const pcap_pkthdr *header,
                                  const unsigned char *data) noexcept nogil

    enum:
        PCAP_ERRBUF_SIZE
        PCAP_ERROR
        PCAP_ERROR_BREAK
        PCAP_ERROR_NO_SUCH_DEVICE
        PCAP_ERROR_PERM_DENIED
        PCAP_NETMASK_UNKNOWN

    const char *pcap_lib_version()
    pcap_t *pcap_create(const char *source, char *errbuf)
    int pcap_set_snaplen(pcap_t *p, int snaplen)
    int pcap_set_promisc(pcap_t *p, int promisc)
    int pcap_set_timeout(pcap_t *p, int to_ms)
    int pcap_set_immediate_mode(pcap_t *p, int immediate)
    int pcap_set_buffer_size(pcap_t *p, int buffer_size)
    int pcap_activate(pcap_t *p)
    pcap_t *pcap_open_offline(const char *fname, char *errbuf)
    void pcap_close(pcap_t *p)
    int pcap_dispatch(pcap_t *p, int cnt, pcap_handler callback, unsigned char *user)
    void pcap_breakloop(pcap_t *p)
    int pcap_datalink(pcap_t *p)
    int pcap_compile(pcap_t *p, bpf_program *fp, const char *text, int optimize,
                     bpf_u_int32 netmask)
    int pcap_setfilter(pcap_t *p, bpf_program *fp)
    void pcap_freecode(bpf_program *fp)
    char *pcap_geterr(pcap_t *p)
    const char *pcap_statustostr(int error)
    int pcap_stats(pcap_t *p, pcap_stat *ps)
    int pcap_setnonblock(pcap_t *p, int nonblock, char *errbuf)
    int pcap_get_selectable_fd(pcap_t *p)
