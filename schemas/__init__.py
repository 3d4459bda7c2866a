"""The wgmfa contract: pydantic models of every event, request and reply, how the secrets
in them are sealed (`sealing`) and how peer state is signed (`signing`). Pure, no I/O."""
