"""The router's control plane kept in Redis (`kvrelay serve --redis-url`): redis_plane.py.
The in-memory default and the interface are router/control_plane.py."""
