"""The node agent: the one privileged piece, a DaemonSet pod per GPU node. It maps GPUs to pods
(the kubelet's pod-resources API), measures them (NVML; RAPL for CPU packages), sets and
restores their power limits, and exports per-pod, per-GPU series on /metrics."""
