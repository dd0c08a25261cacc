# Declarations from <pcap/pcap.h>: only what _ext/*.pyx actually uses.

cdef extern from "pcap/pcap.h" nogil:
    const char *pcap_lib_version()
