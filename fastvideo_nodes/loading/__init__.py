"""From the files users have to models in memory: file checks, kind detection, locating a
component in a diffusers folder or a single file, name maps, and one `materialize()`."""
