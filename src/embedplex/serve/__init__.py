"""The process: HTTP server, its protocol, thread priorities, drain on SIGTERM."""
