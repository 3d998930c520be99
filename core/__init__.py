"""The ground floor: typed configs, atomic file io, Orbax checkpoints and statistics. Imports
nothing of steerlab; every other package may import it."""
