"""MQTT for Home Assistant and fleets (`[mqtt]`; the README's MQTT section): state out, owner commands in.

`topics` names the topic tree and checks the prefixes, `commands` turns a command
payload into an owner change (applied through the same `OwnerDesk` as the owner
API and the web app) and its result, `state` builds and paces the state document,
`discovery` writes Home Assistant's discovery configurations, and `bridge` is the
integration `run` starts: one asyncio task of its own with a bounded outbox, so a
broker that goes away never reaches the control path.
"""
