"""A local node: a Node whose pods run as processes on this machine (no container runtime).

``network`` gives every pod a loopback address and resolves pod names; ``podproc`` turns a
container into a process plan; ``status`` writes what a kubelet would report; ``node`` is
the Node and its Lease; ``agent`` does the I/O.
"""
