"""Ray layer: thin actors that unpack small versioned messages and call bikd's pure-torch functions."""
