"""The wgmfa contract: pydantic models of every event, request and reply. Pure, no I/O."""
