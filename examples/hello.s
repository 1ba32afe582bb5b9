# hello.s: one dense layer on npu16, y = relu(round((x @ W + bias) * 2**30 / 2**31)).
#
# W[k][j] = 1 when j == k or j == k + 1 (mod 16), so each output lane is half the sum of two
# neighbouring input lanes, rounded half to even, with ReLU. The four engines overlap through
# tokens: LD loads weights, inputs and requantization parameters; EX preloads the weights and
# streams the 8 input rows through the array; VX requantizes; ST writes the result.
#
# Memory map: DRAM x [0, 128), y [128, 256), W [256, 512), params [512, 704).
#             SPAD x rows 0-7, W rows 16-31, y rows 32-39. ACC results rows 0-7, params 8-10.

.config npu16
.dram_bytes 768
.meta description="one dense layer with ReLU: the README's first program"
.input  x addr=0   shape=8,16 dtype=int8 layout=NC scale=0.05 zero_point=0
.output y addr=128 shape=8,16 dtype=int8 layout=NC scale=0.05 zero_point=0

.segment W addr=256                   # 16 rows of 16 int8 weights (row k = input lane k)
    01010000 00000000 00000000 00000000  # W[0]
    00010100 00000000 00000000 00000000  # W[1]
    00000101 00000000 00000000 00000000  # W[2]
    00000001 01000000 00000000 00000000  # W[3]
    00000000 01010000 00000000 00000000  # W[4]
    00000000 00010100 00000000 00000000  # W[5]
    00000000 00000101 00000000 00000000  # W[6]
    00000000 00000001 01000000 00000000  # W[7]
    00000000 00000000 01010000 00000000  # W[8]
    00000000 00000000 00010100 00000000  # W[9]
    00000000 00000000 00000101 00000000  # W[10]
    00000000 00000000 00000001 01000000  # W[11]
    00000000 00000000 00000000 01010000  # W[12]
    00000000 00000000 00000000 00010100  # W[13]
    00000000 00000000 00000000 00000101  # W[14]
    01000000 00000000 00000000 00000001  # W[15]
.segment params addr=512              # VECTOR parameter rows: bias, multiplier, shift (int32)
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  # bias = 0
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000040 00000040 00000040 00000040 00000040 00000040 00000040 00000040  # mult = 2**30
    00000040 00000040 00000040 00000040 00000040 00000040 00000040 00000040
    1f000000 1f000000 1f000000 1f000000 1f000000 1f000000 1f000000 1f000000  # shift = 31
    1f000000 1f000000 1f000000 1f000000 1f000000 1f000000 1f000000 1f000000

.region load
LOAD    dram_addr=256 dram_stride_inner=16 dst=16 n_inner=16 row_bytes=16 signal=EX  # W
LOAD    dram_addr=0 dram_stride_inner=16 dst=0 n_inner=8 row_bytes=16 signal=EX      # x
LOAD    dram_addr=512 dram_stride_inner=64 dst=8 n_inner=3 row_bytes=64 mem=ACC signal=VX

.region dense
PRELOAD spad_addr=16 wait=LD                                  # W -> shadow weight bank
MATMUL  spad_addr=0 acc_addr=0 n_inner=8 swap=1 wait=LD signal=VX  # ACC[0:8] = x @ W
VECTOR  acc_addr=0 spad_addr=32 param_addr=8 n=8 clamp_min=0 wait=EX,LD signal=ST

.region store
STORE   dram_addr=128 dram_stride_inner=16 src=32 n_inner=8 row_bytes=16 wait=VX
HALT
