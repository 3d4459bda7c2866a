"""The reaper: follows peer state and gateway statistics, and revokes MFA sessions whose
peer has gone quiet, never connected, or outlived its lifetime."""
