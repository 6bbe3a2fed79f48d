"""Tile 7 (csrc/int3_gemm_wa.cu) emulated on the CPU: the kernel's index math — cp.async units and their XOR
swizzle, each lane's code chunk and scale group, the permuted k order (lane t's A registers are pairs 2s, 2s + 1
of chunk t; its B registers x[row][32t + 4s .. + 3] by one 8-byte load), the mma.m16n8k16 fragment layouts, the
low-rank epilogue's transposed U loads and t (hi + lo) rows, and the swizzled staging of y — replayed in numpy
for one split and compared with x @ deq(Q)^T + t @ ut in float64. A wrong lane mapping or k order gives a
relative error near 1; the kernel's arithmetic gives ~2e-4 (fp16). Tile 8 (the same kernel with warpgroup MMAs) is
emulated with run(..., wg=True): each landed stage of x rewritten in the wgmma's K-major core-matrix layout by its permute_x, and B read
back through the descriptors the kernel builds. Run it after changing the kernel's layout, before spending
device time:

    python scripts/emulate_tile7.py
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from milo_tensor.quant.packing import pack_int3, unpack_int3  # noqa: E402

BN, BK, THREADS, WARPS = 128, 128, 256, 8


def swz(row, unit): return row, unit ^ (row & 7)  # (row, physical 16-byte unit), 128- and 256-byte rows alike


def ldm(tile, rows_units, trans=False):
    """ldmatrix.x4 (.trans): lanes 8i..8i+7 address the rows of matrix i; thread t gets 2 halves of each."""
    out = np.zeros((32, 4, 2), tile.dtype)
    for i in range(4):
        for t in range(32):
            if not trans:
                r, pu = swz(*rows_units[8 * i + t // 4])
                out[t, i] = tile[r, pu, 2 * (t % 4): 2 * (t % 4) + 2]
            else:  # element (row 2 (t % 4) + j, column t // 4) of the stored 8 x 8 matrix
                for j in range(2):
                    r, pu = swz(*rows_units[8 * i + 2 * (t % 4) + j])
                    out[t, i, j] = tile[r, pu, t // 4]
    return out


def mma(acc, a, b0, b1):
    """acc[lane] (4 floats) += A (16x16 from a[lane][4][2]) @ B (16x8 from b0[lane], b1[lane])."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for t in range(32):
        g, tq = t // 4, t % 4
        A[g, 2*tq:2*tq+2] = a[t, 0]; A[g+8, 2*tq:2*tq+2] = a[t, 1]
        A[g, 2*tq+8:2*tq+10] = a[t, 2]; A[g+8, 2*tq+8:2*tq+10] = a[t, 3]
        B[2*tq:2*tq+2, g] = b0[t]; B[2*tq+8:2*tq+10, g] = b1[t]
    C = A @ B
    for t in range(32):
        g, tq = t // 4, t % 4
        acc[t] += [C[g, 2*tq], C[g, 2*tq+1], C[g+8, 2*tq], C[g+8, 2*tq+1]]


def wgmma_b(XS, start, lbo, sbo, BT):
    """B (16 k slots x BT) as a wgmma reads a K-major operand without swizzle from the byte-addressed values
    XS: core matrix (k half e, 8-row group) at start + e lbo + group sbo, row n % 8 at + 16 bytes, slot i at + 2 i."""
    B = np.zeros((16, BT), XS.dtype)
    for kap in range(16):
        for n in range(BT):
            B[kap, n] = XS[(start + (kap // 8) * lbo + (n // 8) * sbo + (n % 8) * 16 + (kap % 8) * 2) // 2]
    return B


def stage_x_tile8(X, BT, dt):
    """Tile 8's permute_x: task (row n = task % BT, j = task / BT) reads k 8j + 32u .. + 7 (u = 0..3) from the
    landed stage X (tile 7's swizzled [row][unit] tile) and stores, for each word w, words w of the four pieces
    as one 16-byte core-matrix row at ((4j + w) BT/8 + n/8) 128 + (n%8) 16 bytes."""
    XS = np.zeros(BT * 128, dt)  # BT rows x 256 bytes, as values
    for task in range(BT * 4):
        n, j = task % BT, task // BT
        pieces = [X[swz(n, 4 * u + j)] for u in range(4)]
        for w in range(4):
            off = (((4 * j + w) * (BT // 8) + (n >> 3)) * 128 + (n & 7) * 16) // 2
            XS[off: off + 8] = np.concatenate([pc[2 * w: 2 * w + 2] for pc in pieces])
    return XS


def run(M, N, K, G, dt=np.float16, seed=0, R=0, wg=False):
    """wg: tile 8 (x stored in the wgmma's B layout, B read through the descriptors the kernel builds)."""
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(0, 8, (N, K))).to(torch.int32)
    qbytes = pack_int3(codes).numpy().view(np.uint8).reshape(N, -1)  # [N, 3K/8]
    s = (rng.random((N, K // G)) * 0.01 + 0.005).astype(dt).astype(np.float32)
    z = (rng.random((N, K // G)) * 7).astype(dt).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(dt)
    ut = (rng.standard_normal((R, N)) * 0.05).astype(dt)
    t32 = (rng.standard_normal((M, R)) * 0.5).astype(np.float32)
    BT = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 or not wg else 128  # int3_gemm_wa_bt
    NJ = BT // 8
    y = np.zeros((M, N), np.float64)
    for bx in range((M + BT - 1) // BT):
        for by in range((N + BN - 1) // BN):
            m0, n0 = bx * BT, by * BN
            acc = np.zeros((WARPS, NJ, 32, 4))
            for st in range(K // BK):
                X = np.zeros((BT, 16, 8), dt)  # physical x tile: 16-byte units of 8 values
                for tid in range(THREADS):
                    for i in range(BT * 16 // THREADS):
                        u = tid + i * THREADS; row, unit = u >> 4, u & 15
                        if m0 + row < M:
                            r, pu = swz(row, unit); X[r, pu] = x[m0 + row, st*BK + unit*8: st*BK + unit*8 + 8]
                Q = np.zeros((BN, 48), np.uint8)
                for tid in range(THREADS):
                    for i in range(2):
                        u = tid + i * THREADS
                        if u < BN * 3:
                            row, part = u // 3, u % 3
                            if n0 + row < N:
                                Q[row, part*16:part*16+16] = qbytes[n0+row, st*48 + part*16: st*48 + part*16 + 16]
                Xflat = X.reshape(BT, 128)
                XS = stage_x_tile8(X, BT, dt) if wg else None
                for warp in range(WARPS):
                    wd, sc, c0 = {}, {}, {}
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        for h in range(2):
                            r = warp * 16 + g + 8 * h; n = n0 + r
                            # the lane's chunk as the kernel's words hold it (smem Q), decoded by the packing's own
                            # unpacker: code 2p + e is what chunk_pair(wd, p) gives in half e
                            wd[lane, h] = unpack_int3(torch.from_numpy(Q[r, t*12: t*12 + 12].view(np.int32).copy())
                                                      .view(1, 3))[0].numpy()
                            gi = (st * BK + 32 * t) // G
                            sc[lane, h] = np.float32(s[n, gi] if n < N else 0.0)
                            c0[lane, h] = np.float32(-(z[n, gi] if n < N else 0.0) * sc[lane, h])
                            if dt == np.float16:  # WaDequant<half>: c0 rounded to fp16, q s + c0 rounded once
                                c0[lane, h] = np.float32(np.float16(c0[lane, h]))
                    for ss in range(8):
                        a = np.zeros((32, 4, 2), dt)
                        for lane in range(32):
                            for reg, (h, p) in enumerate([(0, 2*ss), (1, 2*ss), (0, 2*ss+1), (1, 2*ss+1)]):
                                for e in range(2):
                                    q_ = np.float32(wd[lane, h][2 * p + e])
                                    a[lane, reg, e] = (q_ * sc[lane, h] + c0[lane, h]).astype(dt)
                        if wg:  # one m64nBTk16 per warpgroup: this warp's 16 rows of it, B from the descriptor
                            B = wgmma_b(XS, 2 * ss * (BT // 8) * 128, (BT // 8) * 128, 128, BT)
                            for j in range(NJ):
                                lanes = range(32)
                                b0 = np.array([B[2 * (l & 3): 2 * (l & 3) + 2, 8 * j + (l >> 2)] for l in lanes])
                                b1 = np.array([B[2 * (l & 3) + 8: 2 * (l & 3) + 10, 8 * j + (l >> 2)] for l in lanes])
                                mma(acc[warp, j], a, b0, b1)
                            continue
                        for j in range(NJ):
                            b0 = np.zeros((32, 2), dt); b1 = np.zeros((32, 2), dt)
                            for lane in range(32):
                                g, t = lane >> 2, lane & 3
                                row = 8 * j + g
                                pu = (4 * t + (ss >> 1)) ^ (row & 7)
                                off = pu * 8 + 4 * (ss & 1)  # in values: unit * 8 + 8 bytes * (s & 1)
                                b0[lane] = Xflat[row, off: off + 2]; b1[lane] = Xflat[row, off + 2: off + 4]
                            mma(acc[warp, j], a, b0, b1)
            for r0 in range(0, R, 64):  # the low-rank epilogue
                U = np.zeros((64, 16, 8), dt); TH = np.zeros((BT, 8, 8), dt); TL = np.zeros((BT, 8, 8), dt)
                for tid in range(THREADS):
                    for i in range(64 * 16 // THREADS):
                        u = tid + i * THREADS; r, unit = u >> 4, u & 15
                        if r0 + r < R and n0 + unit * 8 < N:
                            rr, pu = swz(r, unit); U[rr, pu] = ut[r0 + r, n0 + unit*8: n0 + unit*8 + 8]
                for u in range(BT * 8):
                    m, unit = u >> 3, u & 7
                    v = np.array([t32[m0 + m, r0 + unit*8 + e] if (m0 + m < M and r0 + unit*8 + e < R) else 0.0
                                  for e in range(8)], np.float32)
                    hi = v.astype(dt); lo = (v - hi.astype(np.float32)).astype(dt)
                    rr, pu = swz(m, unit); TH[rr, pu] = hi; TL[rr, pu] = lo
                for warp in range(WARPS):
                    for ks in range(4):
                        a = ldm(U, [(16*ks + (l & 7) + ((l >> 4) & 1) * 8, 2*warp + ((l >> 3) & 1)) for l in range(32)],
                                trans=True)
                        for jj in range(NJ // 2):
                            for T_ in (TH, TL):
                                b = ldm(T_, [(16*jj + (l & 7) + ((l >> 4) << 3), 2*ks + ((l >> 3) & 1)) for l in range(32)])
                                mma(acc[warp, 2*jj], a, b[:, 0], b[:, 1])
                                mma(acc[warp, 2*jj + 1], a, b[:, 2], b[:, 3])
            SY = np.zeros((BT, 16, 8), dt)  # y staged: [row][unit ^ (row & 7)][8]
            for warp in range(WARPS):
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for j in range(NJ):
                        for h in range(2):
                            for e in range(2):
                                row, col = 8*j + 2*t + e, warp*16 + g + 8*h
                                SY[row, (col >> 3) ^ (row & 7), col & 7] = acc[warp, j, lane, 2*h + e]
            for u in range(BT * 16):
                row, unit = u >> 4, u & 15
                if m0 + row < M and n0 + unit * 8 < N:
                    y[m0 + row, n0 + unit*8: n0 + unit*8 + 8] = SY[swz(row, unit)]
    wref = (codes.numpy().reshape(N, K // G, G) - z[..., None]) * s[..., None]
    ref = x.astype(np.float64) @ wref.reshape(N, K).T + t32.astype(np.float64) @ ut.astype(np.float64)
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    print(M, N, K, G, R, dt.__name__, "tile 8" if wg else "tile 7", f"rel err {err:.2e}")
    return err


if __name__ == "__main__":
    assert run(20, 136, 128, 64) < 3e-3            # BT = 32, a partial row and column tile
    assert run(9, 128, 256, 32) < 3e-3             # BT = 16, two stages, g = 32
    assert run(70, 136, 128, 128) < 3e-3           # BT = 64, two row blocks
    assert run(12, 136, 128, 64, R=100) < 3e-3     # two rank chunks, the second partial
    assert run(40, 136, 256, 64, wg=True) < 3e-3   # tile 8, BT = 64, a partial row block, two stages
    assert run(70, 128, 128, 32, R=20, wg=True) < 3e-3  # tile 8, BT = 128
    assert run(9, 136, 128, 64, R=20, wg=True) < 3e-3   # tile 8, BT = 16
    assert run(24, 128, 256, 128, wg=True) < 3e-3       # tile 8, BT = 32
