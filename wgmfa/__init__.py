"""The `wgmfa` command: `up`, `admin`, the reference `client`, `events tail`."""
