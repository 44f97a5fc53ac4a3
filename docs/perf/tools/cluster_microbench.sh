# The runs of docs/perf/gpu.md's "Session 22" one-cluster table (GPU machine, repo root).
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
nvcc -O3 -arch=sm_90a -o /tmp/cmb docs/perf/tools/cluster_microbench.cu || exit 1
B=/tmp/cmb
M=$((1 << 20))
# Streaming from HBM: plain grids of 1..132 CTAs (one per SM), loads and TMA.
for c in 1 2 4 8 16 24 32; do
  $B stream $c $((16 * M)) 0 1 0; $B stream $c $((16 * M)) 1 1 0
done
$B stream 66 $((6 * M)) 0 1 0; $B stream 66 $((6 * M)) 1 1 0
$B stream 132 $((3 * M)) 0 1 0; $B stream 132 $((3 * M)) 1 1 0
for c in 8 16; do $B stream $c $((16 * M)) 1 1 0 16384 12; $B stream $c $((16 * M)) 1 1 0 65536 3; done
# The same CTAs launched as one cluster.
for c in 8 16; do $B stream $c $((16 * M)) 0 $c 0; $B stream $c $((16 * M)) 1 $c 0; done
# L2-resident data (the same 24 MB each time).
$B stream 16 $((3 * M / 2)) 0 1 1; $B stream 16 $((3 * M / 2)) 1 1 1
$B stream 132 $((192 * 1024)) 0 1 1; $B stream 132 $((192 * 1024)) 1 1 1
# Hand-offs inside one cluster.
for n in 2560 6912; do for cl in 2 4 8 16; do for m in 0 1 2; do $B cbar $cl $n $m 20000; done; done; done
