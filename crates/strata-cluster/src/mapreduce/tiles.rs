//! An image filtered tile by tile on the cluster's GPU actors: a Gaussian blur and a
//! Sobel edge map, reassembled, and reduced to an intensity histogram.
//!
//! A grey image (`[height, width]`, values 0..=255) is cut into tiles ([`grid`]); each
//! travels with a halo of [`HALO`] pixels (the blur's radius 2 plus the Sobel's 1), the
//! border pixels repeated beyond the image's edge ([`cut`]). The map task [`FILTER`] runs four convolutions on its
//! node's GPU actor without padding, each shrinking the tile: the blur as a horizontal
//! and a vertical pass of the binomial kernel `[1 4 6 4 1] / 16`, then the Sobel
//! derivatives as a horizontal pass (`[-1 0 1]` and `[1 2 1]` into two channels) and a
//! vertical one (`[1 2 1]` on the first, `[-1 0 1]` on the second), which leaves exactly
//! the tile. The node then takes the gradient magnitude `sqrt(gx*gx + gy*gy)` per pixel
//! on its CPU and counts the rounded magnitudes (clamped to 255) into [`BINS`] bins.
//!
//! Why the tiles equal the whole image bitwise: each output pixel is computed from the
//! same input pixels by the same arithmetic whatever tile it lies in. The convolutions
//! are im2col + GEMM, whose kernels sum each output element's products in one
//! accumulator, in patch order, with fused multiply-adds; the patch length depends on
//! the filter alone, not on the tile's size, so a pixel's sum does not depend on where
//! its tile starts or how large it is. The whole-image reference is the same map task
//! over one tile covering the image ([`Tile::whole`]), halo included, so both paths
//! run the same kernels on the same numbers. The magnitude is IEEE single
//! precision on the CPU (Rust does not contract `a * a + b * b` into an FMA). The
//! histogram's counts are integers, exact in f32 below 2^24 per bin, and the [`SUM`]
//! reduce adds them exactly. The tests check all of this on the test adapter.
//!
//! [`SUM`]: super::SUM

use serde::{Deserialize, Serialize};
use strata_gpu::GpuHandle;
use strata_tensor::HostTensor;
use strata_tensor::geometry::Conv2dParams;

use super::{MapReduceOptions, Shard};
use crate::tasks::{Demand, TaskContext, TaskFuture, TaskInput, TaskOutput, TaskRegistry, decode, encode};

/// The map task: a tile with halo in, its edge magnitudes and histogram out.
pub const FILTER: &str = "tiles.edges";
/// Pixels a tile needs on each side beyond itself.
pub const HALO: usize = 3;
/// Histogram bins, one per rounded magnitude 0..=255.
pub const BINS: usize = 256;
/// The side of the tiles the examples cut.
pub const TILE: usize = 256;

/// The binomial approximation of a Gaussian with sigma 1, exact in binary.
const BLUR: [f32; 5] = [0.0625, 0.25, 0.375, 0.25, 0.0625];
const DERIVATIVE: [f32; 3] = [-1.0, 0.0, 1.0];
const SMOOTH: [f32; 3] = [1.0, 2.0, 1.0];

/// A rectangle of the output image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tile {
    /// First column.
    pub x: usize,
    /// First row.
    pub y: usize,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

impl Tile {
    /// The whole of a `width` x `height` image as one tile.
    pub fn whole(width: usize, height: usize) -> Self {
        Self { x: 0, y: 0, width, height }
    }
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{} at ({}, {})", self.width, self.height, self.x, self.y)
    }
}

/// Errors of cutting and reassembling tiles.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TileError {
    /// The image is not a non-empty `[height, width]` tensor.
    #[error("an image must be a non-empty [height, width] tensor, not {shape}")]
    NotAnImage {
        /// The shape given.
        shape: String,
    },
    /// The tile side is zero.
    #[error("tiles must be at least 1 pixel wide")]
    ZeroTile,
    /// A tile reaches beyond the image.
    #[error("tile {tile} reaches beyond the {width}x{height} image")]
    Outside {
        /// The tile.
        tile: Tile,
        /// The image's width.
        width: usize,
        /// The image's height.
        height: usize,
    },
    /// A filtered tile does not have its tile's size.
    #[error("filtered tile {tile} came back as {shape}")]
    WrongSize {
        /// The tile.
        tile: Tile,
        /// The shape it came back as.
        shape: String,
    },
}

fn dims(image: &HostTensor<f32>) -> Result<(usize, usize), TileError> {
    match image.shape().dims() {
        &[h, w] if h > 0 && w > 0 => Ok((h, w)),
        _ => Err(TileError::NotAnImage { shape: image.shape().to_string() }),
    }
}

fn check(tile: Tile, width: usize, height: usize) -> Result<(), TileError> {
    let inside = tile.width > 0
        && tile.height > 0
        && tile.x.checked_add(tile.width).is_some_and(|e| e <= width)
        && tile.y.checked_add(tile.height).is_some_and(|e| e <= height);
    if inside { Ok(()) } else { Err(TileError::Outside { tile, width, height }) }
}

/// The tiles of a `width` x `height` image, `size` x `size` (smaller at the right and
/// bottom edges), row by row.
pub fn grid(width: usize, height: usize, size: usize) -> Result<Vec<Tile>, TileError> {
    if size == 0 {
        return Err(TileError::ZeroTile);
    }
    let mut tiles = Vec::new();
    for y in (0..height).step_by(size) {
        for x in (0..width).step_by(size) {
            tiles.push(Tile { x, y, width: size.min(width - x), height: size.min(height - y) });
        }
    }
    Ok(tiles)
}

/// The pixels of `tile` with a [`HALO`] around them, as the `[1, 1, height + 6,
/// width + 6]` input of [`FILTER`]. Beyond the image's border the border pixels repeat
/// (clamp to edge), so the border is no edge.
pub fn cut(image: &HostTensor<f32>, tile: Tile) -> Result<HostTensor<f32>, TileError> {
    let (h, w) = dims(image)?;
    check(tile, w, h)?;
    let (th, tw) = (tile.height + 2 * HALO, tile.width + 2 * HALO);
    let src = image.data();
    // The image column of each halo column, clamped to the image.
    let cols: Vec<usize> = (0..tw).map(|c| (tile.x + c).saturating_sub(HALO).min(w - 1)).collect();
    let mut out = Vec::with_capacity(th * tw);
    for r in 0..th {
        let row = &src[(tile.y + r).saturating_sub(HALO).min(h - 1) * w..][..w];
        out.extend(cols.iter().map(|&x| row[x]));
    }
    Ok(HostTensor::new(vec![1, 1, th, tw], out).expect("sizes match"))
}

/// The shard of [`FILTER`] for `tile` of `image`.
pub fn shard(image: &HostTensor<f32>, tile: Tile) -> Result<Shard, TileError> {
    Ok(Shard::new(encode(&tile), vec![cut(image, tile)?]))
}

/// The shards of every tile of `tiles`.
pub fn shards(image: &HostTensor<f32>, tiles: &[Tile]) -> Result<Vec<Shard>, TileError> {
    tiles.iter().map(|t| shard(image, *t)).collect()
}

/// Options for a tiles job: the filtered tile is a side output (reassembled by the
/// caller), the histogram is reduced; each map task takes a GPU slot.
pub fn options() -> MapReduceOptions {
    MapReduceOptions { side_tensors: 1, map_demand: Demand::default().gpu_slots(1), ..MapReduceOptions::default() }
}

fn weights(shape: Vec<usize>, data: Vec<f32>) -> HostTensor<f32> {
    HostTensor::new(shape, data).expect("filter shapes are fixed")
}

/// Filters a `[1, 1, h + 6, w + 6]` tile with halo on `gpu`: the `[h, w]` gradient
/// magnitudes of the blurred tile (see the module documentation).
pub async fn edges(gpu: &GpuHandle, with_halo: HostTensor<f32>) -> Result<HostTensor<f32>, String> {
    let (th, tw) = match with_halo.shape().dims() {
        &[1, 1, th, tw] if th > 2 * HALO && tw > 2 * HALO => (th, tw),
        _ => return Err(format!("a tile with halo must be [1, 1, h + 6, w + 6], not {}", with_halo.shape())),
    };
    let (h, w) = (th - 2 * HALO, tw - 2 * HALO);
    let blur_h = weights(vec![1, 1, 1, 5], BLUR.to_vec());
    let blur_v = weights(vec![1, 1, 5, 1], BLUR.to_vec());
    let sobel_h = weights(vec![2, 1, 1, 3], [DERIVATIVE, SMOOTH].concat());
    let z = [0.0; 3];
    let sobel_v = weights(vec![2, 2, 3, 1], [SMOOTH, z, z, DERIVATIVE].concat());
    let grads = gpu
        .with(move |ex| {
            let g = ex.gpu();
            let valid = Conv2dParams::default();
            let mut x = g.upload(&with_halo)?;
            for k in [&blur_h, &blur_v, &sobel_h, &sobel_v] {
                let k = g.upload(k)?;
                x = g.conv2d(&x, &k, None, valid)?;
            }
            g.download::<f32>(&x)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if grads.shape().dims() != [1, 2, h, w] {
        return Err(format!("the filter made {}, not [1, 2, {h}, {w}]", grads.shape()));
    }
    let (gx, gy) = grads.data().split_at(h * w);
    let mag = gx.iter().zip(gy).map(|(&a, &b)| (a * a + b * b).sqrt()).collect();
    Ok(HostTensor::new(vec![h, w], mag).expect("sizes match"))
}

/// A magnitude as an 8-bit intensity: rounded, clamped to 0..=255.
pub fn intensity(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Counts of each [`intensity`] of `values`, as a `[256]` tensor.
pub fn histogram(values: &HostTensor<f32>) -> HostTensor<f32> {
    let mut counts = [0u32; BINS];
    for &v in values.data() {
        counts[usize::from(intensity(v))] += 1;
    }
    HostTensor::new(vec![BINS], counts.iter().map(|&c| c as f32).collect()).expect("sizes match")
}

/// Registers [`FILTER`] in `registry` (with the built-in reduces).
pub fn register(registry: &TaskRegistry) {
    super::register_builtins(registry);
    registry.register(FILTER, |ctx: TaskContext, input: TaskInput| -> TaskFuture {
        Box::pin(async move {
            let tile: Tile = decode(&input.args).map_err(|e| format!("{FILTER}: malformed tile: {e}"))?;
            let gpu = ctx.gpu.ok_or_else(|| format!("{FILTER}: node {} has no GPU actor for tile {tile}", ctx.node))?;
            let [x]: [HostTensor<f32>; 1] = input
                .tensors
                .try_into()
                .map_err(|t: Vec<_>| format!("{FILTER}: tile {tile} needs one tensor, got {}", t.len()))?;
            let want = [1, 1, tile.height + 2 * HALO, tile.width + 2 * HALO];
            if x.shape().dims() != want {
                return Err(format!("{FILTER}: tile {tile} with halo must be {want:?}, not {}", x.shape()));
            }
            let e = edges(&gpu, x).await.map_err(|e| format!("{FILTER}: tile {tile}: {e}"))?;
            let hist = histogram(&e);
            Ok(TaskOutput { data: Vec::new(), tensors: vec![e, hist] })
        })
    });
}

/// Pastes filtered tiles (by their [`Tile`]s) into a `width` x `height` image.
pub fn assemble(
    width: usize,
    height: usize,
    tiles: &[Tile],
    filtered: &[&HostTensor<f32>],
) -> Result<HostTensor<f32>, TileError> {
    let mut out = vec![0f32; width * height];
    for (tile, t) in tiles.iter().zip(filtered) {
        check(*tile, width, height)?;
        if t.shape().dims() != [tile.height, tile.width] {
            return Err(TileError::WrongSize { tile: *tile, shape: t.shape().to_string() });
        }
        for r in 0..tile.height {
            let dst = (tile.y + r) * width + tile.x;
            out[dst..dst + tile.width].copy_from_slice(&t.data()[r * tile.width..(r + 1) * tile.width]);
        }
    }
    Ok(HostTensor::new(vec![height, width], out).expect("sizes match"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_and_halos_repeat_the_border() {
        let tiles = grid(5, 3, 2).unwrap();
        assert_eq!(tiles.len(), 6);
        assert_eq!(tiles[2], Tile { x: 4, y: 0, width: 1, height: 2 });
        assert_eq!(tiles[5], Tile { x: 4, y: 2, width: 1, height: 1 });
        let image = HostTensor::new(vec![3, 5], (1..=15).map(|v| v as f32).collect()).unwrap();
        let c = cut(&image, tiles[5]).unwrap();
        assert_eq!(c.shape().dims(), [1, 1, 7, 7]);
        // Row 3 of the cut is image row 2; columns 0..3 are image columns 1..4, the rest
        // lie beyond the right edge and repeat column 4.
        assert_eq!(&c.data()[3 * 7..4 * 7], &[12.0, 13.0, 14.0, 15.0, 15.0, 15.0, 15.0]);
        assert_eq!(&c.data()[4 * 7..5 * 7], &c.data()[3 * 7..4 * 7], "below the image, row 2 again");
        let whole = cut(&image, Tile::whole(5, 3)).unwrap();
        assert_eq!(&whole.data()[..11], &[1., 1., 1., 1., 2., 3., 4., 5., 5., 5., 5.]);
        assert_eq!(&whole.data()[3 * 11..4 * 11], &whole.data()[..11]);
        let e = cut(&image, Tile { x: 4, y: 0, width: 2, height: 1 }).unwrap_err();
        assert_eq!(e.to_string(), "tile 2x1 at (4, 0) reaches beyond the 5x3 image");
        assert_eq!(grid(5, 3, 0).unwrap_err(), TileError::ZeroTile);
    }

    #[test]
    fn tiles_reassemble() {
        let image = HostTensor::new(vec![3, 5], (1..=15).map(|v| v as f32).collect()).unwrap();
        let tiles = grid(5, 3, 2).unwrap();
        let parts: Vec<HostTensor<f32>> = tiles
            .iter()
            .map(|t| {
                let c = cut(&image, *t).unwrap();
                let tw = t.width + 2 * HALO;
                let inner = (0..t.height)
                    .flat_map(|r| c.data()[(r + HALO) * tw + HALO..(r + HALO) * tw + HALO + t.width].to_vec())
                    .collect();
                HostTensor::new(vec![t.height, t.width], inner).unwrap()
            })
            .collect();
        let back = assemble(5, 3, &tiles, &parts.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(back, image);
        assert_eq!(histogram(&back).data()[15], 1.0);
        assert_eq!((intensity(254.5), intensity(-1.0), intensity(1e9)), (255, 0, 255));
    }
}
