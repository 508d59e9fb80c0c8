"""Files in and out: format detection, the trust boundary for what a file may contain, archives."""
