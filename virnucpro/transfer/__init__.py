"""Files over the connection, for workers that cannot see the client's file system: protocol, core, both shells."""
