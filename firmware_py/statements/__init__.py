"""Bill-credit statements: per event and per period, from the journal, signed (docs/command-line.md, statement)."""
