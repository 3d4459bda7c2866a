"""The core: users, devices, locations, MFA verification, PSK issuance and session state.
The only process with SQL."""

VERSION = "0.1.0"
