"""par-deploy: train, export and run the Physical Autoregressive Model (PAR) for robot manipulation."""

__version__ = "0.1.0"
