"""Prometheus metrics (`[metrics]`, the README's metrics table): the gateway read at scrape time, names `powershare_`.

`families` turns the gateway's read model, link book, frame and error counters into
metric families (and keeps the two things only the running gateway can count: the
reaction-time histogram and the dispatch answers); `server` serves them as text at
`/metrics`, an integration in `assembly.INTEGRATIONS`.
"""
