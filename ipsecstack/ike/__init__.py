"""Sans-IO IKEv2 (RFC 7296): wire codec, keying material, exchanges. No sockets, clock or OS randomness."""
