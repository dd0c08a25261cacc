# cython: language_level=3, embedsignature=True
"""libpcap capture engine (Cython). For now it only reports the libpcap version."""

cimport pcap


def libpcap_version() -> str:
    """Return libpcap's own version string, e.g. 'libpcap version 1.10.3 (with TPACKET_V3)'."""
    return pcap.pcap_lib_version().decode("ascii", "replace")
