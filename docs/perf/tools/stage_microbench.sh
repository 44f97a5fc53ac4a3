# The runs of docs/perf/gpu.md's "Session 19" stage-floor table (GPU machine, repo root).
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
nvcc -O3 -arch=sm_90a -o /tmp/smb docs/perf/tools/stage_microbench.cu 2>/dev/null || exit 1
B=/tmp/smb
for n in 2560 6912; do
 for c in 264 132; do
  $B 0 $n $c 1 0 2000
  for m in 1 6 7 8 9 2 5; do $B $m $n $c 1 0 2000; done
  for cl in 2 4 8; do $B 3 $n $c $cl 0 2000; done
 done
done
for k in 0 1 2 3 4; do $B 0 2560 264 1 $k 2000; $B 1 2560 264 1 $k 2000; done
$B 4 2560 2 1 0 20000
# Session 20 (gpu-stage-floor-s20-h200.txt): one CTA of 512 threads per SM against two of 256.
for n in 2560 6912; do for m in 0 1 9; do
  $B $m $n 264 1 0 2000 256; $B $m $n 132 1 0 2000 256; $B $m $n 132 1 0 2000 512
done; done
# Session 23 (gpu-barrier-kinds-s23-h200.txt): barrier kinds 5-7 (a flag per CTA, eight
# counters) against the fused kernel's (0), twice.
for rep in 1 2; do for shape in "132 512" "264 256"; do set -- $shape
  for m in 0 1 9; do for k in 0 5 6 7; do $B $m 2560 $1 1 $k 2000 $2; done; done
  for k in 0 5 6 7; do $B 9 6912 $1 1 $k 2000 $2; done
done; done
