//! Where each element of a hot slot's matrices sits in memory.
//!
//! A decode step over many distinct adapters streams every adapter's `A` and `B` once.
//! Read row by row, an r16 matrix is sixteen short interleaved streams (the shrink
//! reads eight rows at once, the expand sixteen), which the hardware prefetchers barely
//! start on before they end; the packed layouts store the elements in the order the
//! kernels read them, so each matrix is one sequential stream (`docs/perf/lora.md`).

use super::BLayout;

/// Rows of `A` per panel in [`ALayout::Panels`] (the shrink's register tile).
pub(crate) const PANEL: usize = 8;
/// Columns per block of `Bᵀ` in [`BLayout::RankOutBlocks`] (the expand's register tile).
pub(crate) const BLOCK: usize = 64;
/// Elements per SIMD load.
const LANES: usize = 8;

/// How a slot's `A` (`[rank, in]`) is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ALayout {
    /// Row-major `[rank, in]`: PEFT's `lora_A.weight` as stored.
    #[default]
    RowMajor,
    /// The rows in panels of eight (the last panel holds `rank % 8` rows when that is
    /// not zero). A panel of `p` rows takes the same place as in row-major order, and
    /// holds its columns eight at a time, `[in / 8][p][8]`, then the `in % 8` last
    /// columns as `[p][in % 8]`: the order the shrink reads them.
    Panels,
}

/// Offset of `A[j, i]` in a matrix of `rank` rows and `n_in` columns.
#[inline]
pub fn a_offset(layout: ALayout, rank: usize, n_in: usize, j: usize, i: usize) -> usize {
    match layout {
        ALayout::RowMajor => j * n_in + i,
        ALayout::Panels => {
            let j0 = j / PANEL * PANEL;
            let rows = PANEL.min(rank - j0);
            let full = n_in / LANES * LANES;
            let k = j - j0;
            j0 * n_in
                + if i < full {
                    i / LANES * LANES * rows + k * LANES + i % LANES
                } else {
                    full * rows + k * (n_in - full) + (i - full)
                }
        }
    }
}

/// The column block holding output `o` of a `Bᵀ` with `n_out` columns in
/// [`BLayout::RankOutBlocks`]: its first column and width.
#[inline]
pub(crate) fn bt_block(n_out: usize, o: usize) -> (usize, usize) {
    let full_blocks = n_out / BLOCK * BLOCK;
    if o < full_blocks {
        return (o / BLOCK * BLOCK, BLOCK);
    }
    let full_lanes = full_blocks + (n_out - full_blocks) / LANES * LANES;
    if o < full_lanes {
        (o / LANES * LANES, LANES)
    } else {
        (full_lanes, n_out - full_lanes)
    }
}

/// Rank rows per quad in [`BLayout::RankQuadBlocks`] (the bytes one `vpdpbusd`
/// lane sums).
pub(crate) const QUAD: usize = 4;

/// Offset of `B[o, j]` (`o < n_out`, `j < rank`) in each layout
/// ([`BLayout::RankQuadBlocks`] needs `rank % 4 == 0`).
#[inline]
pub fn b_offset(layout: BLayout, rank: usize, n_out: usize, o: usize, j: usize) -> usize {
    match layout {
        BLayout::OutRank => o * rank + j,
        BLayout::RankOut => j * n_out + o,
        BLayout::RankOutBlocks => {
            let (o0, w) = bt_block(n_out, o);
            o0 * rank + j * w + (o - o0)
        }
        BLayout::RankQuadBlocks => {
            let (o0, w) = bt_block(n_out, o);
            o0 * rank + j / QUAD * w * QUAD + (o - o0) * QUAD + j % QUAD
        }
    }
}

/// Appends row-major `a` (`[rank, in]`) to `out` rearranged into
/// [`ALayout::Panels`].
///
/// ```
/// use batos_kernels::cpu::lora::{a_offset, pack_a, ALayout};
/// let a: Vec<u32> = (0..3 * 10).collect(); // rank 3, in 10
/// let mut p = Vec::new();
/// pack_a(&a, 3, &mut p);
/// assert_eq!(p[a_offset(ALayout::Panels, 3, 10, 2, 9)], 2 * 10 + 9);
/// ```
pub fn pack_a<T: Copy>(a: &[T], rank: usize, out: &mut Vec<T>) {
    let n_in = a.len() / rank.max(1);
    let full = n_in / LANES * LANES;
    for j0 in (0..rank).step_by(PANEL) {
        let rows = &a[j0 * n_in..(j0 + PANEL.min(rank - j0)) * n_in];
        for i in (0..full).step_by(LANES) {
            for row in rows.chunks_exact(n_in) {
                out.extend_from_slice(&row[i..i + LANES]);
            }
        }
        for row in rows.chunks_exact(n_in) {
            out.extend_from_slice(&row[full..]);
        }
    }
}

/// Appends `b` (`[out, rank]`, PEFT's `lora_B.weight`, [`BLayout::OutRank`]) to `out`
/// transposed and rearranged into [`BLayout::RankOutBlocks`], in one pass.
pub fn pack_b<T: Copy>(b: &[T], rank: usize, out: &mut Vec<T>) {
    let n_out = b.len() / rank.max(1);
    let mut o = 0;
    while o < n_out {
        let (o0, w) = bt_block(n_out, o);
        let rows = &b[o0 * rank..(o0 + w) * rank];
        for c in 0..rank {
            out.extend(rows.chunks_exact(rank).map(|row| row[c]));
        }
        o = o0 + w;
    }
}

/// Appends `b` (`[out, rank]`, `rank % 4 == 0`) to `out` in
/// [`BLayout::RankQuadBlocks`]: per column block, per four rank rows, each output's
/// four values side by side.
///
/// ```
/// use batos_kernels::cpu::lora::{b_offset, pack_b_quads, BLayout};
/// let b: Vec<u32> = (0..10 * 4).collect(); // out 10, rank 4
/// let mut p = Vec::new();
/// pack_b_quads(&b, 4, &mut p);
/// assert_eq!(&p[..8], &[0, 1, 2, 3, 4, 5, 6, 7]); // outputs 0 and 1, ranks 0..4
/// assert_eq!(p[b_offset(BLayout::RankQuadBlocks, 4, 10, 9, 2)], 9 * 4 + 2);
/// ```
pub fn pack_b_quads<T: Copy>(b: &[T], rank: usize, out: &mut Vec<T>) {
    assert!(
        rank.is_multiple_of(QUAD),
        "pack_b_quads: rank {rank} is not a multiple of {QUAD}"
    );
    let n_out = b.len() / rank.max(1);
    let mut o = 0;
    while o < n_out {
        let (o0, w) = bt_block(n_out, o);
        let rows = &b[o0 * rank..(o0 + w) * rank];
        for q in (0..rank).step_by(QUAD) {
            for row in rows.chunks_exact(rank) {
                out.extend_from_slice(&row[q..q + QUAD]);
            }
        }
        o = o0 + w;
    }
}

#[cfg(test)]
/// The inverse of [`pack_a`]: `packed` ([`ALayout::Panels`]) back to row-major
/// `[rank, in]`.
pub(crate) fn unpack_a<T: Copy>(packed: &[T], rank: usize) -> Vec<T> {
    let n_in = packed.len() / rank.max(1);
    let full = n_in / LANES * LANES;
    let mut out = packed.to_vec();
    let mut pos = 0;
    for j0 in (0..rank).step_by(PANEL) {
        let rows = PANEL.min(rank - j0);
        for i in (0..full).step_by(LANES) {
            for k in 0..rows {
                let dst = (j0 + k) * n_in + i;
                out[dst..dst + LANES].copy_from_slice(&packed[pos..pos + LANES]);
                pos += LANES;
            }
        }
        for k in 0..rows {
            let (dst, tail) = ((j0 + k) * n_in + full, n_in - full);
            out[dst..dst + tail].copy_from_slice(&packed[pos..pos + tail]);
            pos += tail;
        }
    }
    out
}

#[cfg(test)]
/// `packed` ([`BLayout::RankQuadBlocks`]) back to row-major `Bᵀ` `[rank, out]`.
pub(crate) fn unpack_bt_quads<T: Copy>(packed: &[T], rank: usize) -> Vec<T> {
    let n_out = packed.len() / rank.max(1);
    let mut out = packed.to_vec();
    for o in 0..n_out {
        for j in 0..rank {
            out[j * n_out + o] = packed[b_offset(BLayout::RankQuadBlocks, rank, n_out, o, j)];
        }
    }
    out
}

#[cfg(test)]
/// `packed` ([`BLayout::RankOutBlocks`]) back to row-major `Bᵀ` `[rank, out]`.
pub(crate) fn unpack_bt<T: Copy>(packed: &[T], rank: usize) -> Vec<T> {
    let n_out = packed.len() / rank.max(1);
    let mut out = packed.to_vec();
    let mut pos = 0;
    let mut o = 0;
    while o < n_out {
        let (o0, w) = bt_block(n_out, o);
        for c in 0..rank {
            out[c * n_out + o0..c * n_out + o0 + w].copy_from_slice(&packed[pos..pos + w]);
            pos += w;
        }
        o = o0 + w;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (rank, columns): partial panels and blocks, tails of every width.
    const SHAPES: [(usize, usize); 8] = [
        (1, 1),
        (4, 203),
        (3, 7),
        (8, 16),
        (12, 77),
        (16, 576),
        (17, 200),
        (64, 131),
    ];

    /// Every layout is a permutation of the matrix's places, on awkward shapes.
    #[test]
    fn offsets_are_permutations() {
        for (r, n) in SHAPES {
            // The unpackers invert the packers.
            let m: Vec<usize> = (0..r * n).collect();
            let (mut pa, mut pb) = (Vec::new(), Vec::new());
            pack_a(&m, r, &mut pa);
            assert_eq!(unpack_a(&pa, r), m, "A r{r} n{n}");
            let bt: Vec<usize> = (0..r * n).map(|i| (i % n) * r + i / n).collect();
            pack_b(&m, r, &mut pb);
            assert_eq!(unpack_bt(&pb, r), bt, "Bt r{r} n{n}");
            let mut seen = vec![false; r * n];
            for j in 0..r {
                for i in 0..n {
                    let k = a_offset(ALayout::Panels, r, n, j, i);
                    assert!(!seen[k], "A r{r} n{n}: ({j}, {i}) collides");
                    seen[k] = true;
                }
            }
            let quads = r % QUAD == 0;
            if quads {
                let mut pq = Vec::new();
                pack_b_quads(&m, r, &mut pq);
                assert_eq!(unpack_bt_quads(&pq, r), bt, "Bt quads r{r} n{n}");
            }
            for layout in [
                BLayout::OutRank,
                BLayout::RankOut,
                BLayout::RankOutBlocks,
                BLayout::RankQuadBlocks,
            ] {
                if layout == BLayout::RankQuadBlocks && !quads {
                    continue;
                }
                let mut seen = vec![false; r * n];
                for o in 0..n {
                    for j in 0..r {
                        let k = b_offset(layout, r, n, o, j);
                        assert!(!seen[k], "B {layout:?} r{r} n{n}: ({o}, {j}) collides");
                        seen[k] = true;
                    }
                }
            }
        }
    }

    /// The packing functions put each element where the offset functions say.
    #[test]
    fn packing_agrees_with_the_offsets() {
        for (r, n) in SHAPES {
            let m: Vec<usize> = (0..r * n).collect();
            let (mut pa, mut pb) = (Vec::new(), Vec::new());
            pack_a(&m, r, &mut pa);
            // m read as B [n, r]: element (o, j) = o·r + j.
            pack_b(&m, r, &mut pb);
            assert_eq!((pa.len(), pb.len()), (r * n, r * n));
            for j in 0..r {
                for i in 0..n {
                    assert_eq!(pa[a_offset(ALayout::Panels, r, n, j, i)], j * n + i);
                    let k = b_offset(BLayout::RankOutBlocks, r, n, i, j);
                    assert_eq!(pb[k], i * r + j, "B r{r} n{n} ({i}, {j})");
                }
            }
            if r % QUAD == 0 {
                let mut pq = Vec::new();
                pack_b_quads(&m, r, &mut pq);
                assert_eq!(pq.len(), r * n);
                for o in 0..n {
                    for j in 0..r {
                        let k = b_offset(BLayout::RankQuadBlocks, r, n, o, j);
                        assert_eq!(pq[k], o * r + j, "B quads r{r} n{n} ({o}, {j})");
                    }
                }
            }
        }
    }

    /// The packed orders are the kernels' read orders: a full panel's first chunk is
    /// eight rows' first eight columns in turn; a full block is one rank row's 64
    /// outputs, then the next row's.
    #[test]
    fn packed_orders_follow_the_kernels() {
        let (r, n) = (16, 576);
        assert_eq!(a_offset(ALayout::Panels, r, n, 1, 0), 8);
        assert_eq!(a_offset(ALayout::Panels, r, n, 7, 7), 63);
        assert_eq!(a_offset(ALayout::Panels, r, n, 0, 8), 64);
        assert_eq!(a_offset(ALayout::Panels, r, n, 8, 0), 8 * 576);
        assert_eq!(b_offset(BLayout::RankOutBlocks, r, n, 63, 0), 63);
        assert_eq!(b_offset(BLayout::RankOutBlocks, r, n, 0, 1), 64);
        assert_eq!(b_offset(BLayout::RankOutBlocks, r, n, 64, 0), 64 * 16);
        let a: Vec<usize> = (0..r * n).collect();
        let mut p = Vec::new();
        pack_a(&a, r, &mut p);
        assert_eq!(&p[..10], &[0, 1, 2, 3, 4, 5, 6, 7, 576, 577]);
        // B [n, r]: the first block holds column 0 of outputs 0..64, then column 1.
        let mut pb = Vec::new();
        pack_b(&a, r, &mut pb);
        assert_eq!(&pb[62..66], &[62 * 16, 63 * 16, 1, 17]);
    }
}
