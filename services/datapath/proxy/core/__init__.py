"""Pure (sans-io) parts of the L7 proxy: parsers, codecs, rule matching, FQDN cache."""
