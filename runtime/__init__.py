"""What every wgmfa process needs that is not the bus: settings loading, logging, the
clock, the process main loop and the exception tree."""
