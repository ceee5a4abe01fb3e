"""The two kernels (cache write, paged decode) with their launchers and torch references."""
