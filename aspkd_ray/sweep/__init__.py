"""Ray Tune sweeps: each trial one ASPKD attack, all sharing one teacher service."""
