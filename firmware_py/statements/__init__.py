"""Bill-credit statements: per event and per period, from the journal, signed (DESIGN §3.11)."""
