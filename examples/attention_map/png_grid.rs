//! One PNG page per layer: a grid of heatmaps (one per head) with token labels on both axes,
//! titles and a colour bar, drawn with plotters' bitmap backend and encoded with `png`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use super::Maps;

/// System fonts tried for characters the built-in font lacks (CJK first).
const FALLBACK_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "C:\\Windows\\Fonts\\msyh.ttc",
];

/// The fonts the pictures use: Ubuntu Light (embedded) and an optional fallback file, chosen per
/// character.
pub struct Fonts {
    main: FontRef<'static>,
    fallback: Option<(PathBuf, FontRef<'static>)>,
}

impl Fonts {
    /// The built-in font and the first fallback found: `explicit` (an error when it cannot be
    /// read), else the first of [`FALLBACK_PATHS`] that exists.
    pub fn load(explicit: Option<&Path>) -> Result<Self> {
        let main_bytes: &'static [u8] = epaint_default_fonts::UBUNTU_LIGHT;
        let main =
            FontRef::try_from_slice(main_bytes).map_err(|e| anyhow!("built-in font: {e}"))?;
        let candidates: Vec<PathBuf> = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => FALLBACK_PATHS.iter().map(PathBuf::from).collect(),
        };
        let mut fallback = None;
        for path in candidates {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if explicit.is_some() => {
                    return Err(e).with_context(|| format!("--font {}", path.display()))
                }
                Err(_) => continue,
            };
            // Read once and kept for the whole run.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            let font = FontRef::try_from_slice(bytes)
                .map_err(|e| anyhow!("{}: not a usable font: {e}", path.display()))?;
            fallback = Some((path, font));
            break;
        }
        Ok(Self { main, fallback })
    }

    /// The font that draws `c`: the built-in one when it has it, else the fallback when that
    /// has it, else the built-in one (a missing glyph shows as its box).
    fn font_for(&self, c: char) -> &FontRef<'static> {
        if self.main.glyph_id(c).0 != 0 {
            return &self.main;
        }
        match &self.fallback {
            Some((_, f)) if f.glyph_id(c).0 != 0 => f,
            _ => &self.main,
        }
    }

    /// Lays out `s` at `size` pixels: each glyph (font, id, x of its origin), the width, and the
    /// ascent and descent of the built-in font (the line box).
    fn layout(
        &self,
        s: &str,
        size: f32,
    ) -> (
        Vec<(&FontRef<'static>, ab_glyph::GlyphId, f32)>,
        f32,
        f32,
        f32,
    ) {
        let scale = PxScale::from(size);
        let mut glyphs = Vec::new();
        let mut caret = 0f32;
        let mut prev: Option<(&FontRef<'static>, ab_glyph::GlyphId)> = None;
        for c in s.chars() {
            let font = self.font_for(c);
            let sf = font.as_scaled(scale);
            let id = font.glyph_id(c);
            if let Some((pf, pid)) = prev {
                if std::ptr::eq(pf, font) {
                    caret += sf.kern(pid, id);
                }
            }
            glyphs.push((font, id, caret));
            caret += sf.h_advance(id);
            prev = Some((font, id));
        }
        let main = self.main.as_scaled(scale);
        (glyphs, caret, main.ascent(), main.descent())
    }

    /// Width of `s` in pixels at `size`.
    pub fn width(&self, s: &str, size: f32) -> f32 {
        self.layout(s, size).1
    }

    /// Characters of `labels` that no loaded font has.
    pub fn missing_chars(&self, labels: &[String]) -> BTreeSet<char> {
        let has = |c: char| {
            self.main.glyph_id(c).0 != 0
                || self
                    .fallback
                    .as_ref()
                    .is_some_and(|(_, f)| f.glyph_id(c).0 != 0)
        };
        labels
            .iter()
            .flat_map(|l| l.chars())
            .filter(|&c| !c.is_whitespace() && !has(c))
            .collect()
    }
}

/// Colour of a weight: viridis over `w^gamma`.
pub fn colour(w: f32, gamma: f64) -> RGBColor {
    let v = (w.clamp(0.0, 1.0) as f64).powf(gamma);
    ViridisRGB::get_color_normalized(v, 0.0, 1.0)
}

/// The weights the colour bar labels.
pub const TICKS: [f64; 9] = [0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0];

/// Sizes of one page, from the number of tokens.
struct Layout {
    cell: i32,
    font: f32,
    label: i32,
    panel_w: i32,
    panel_h: i32,
}

const HEADER: i32 = 70;
const TITLE: i32 = 26;
const GAP: i32 = 18;
const BAR_W: i32 = 110;

/// Writes the page of `layer` to `path`; returns its size in pixels.
pub fn write_layer(
    path: &Path,
    maps: &Maps,
    layer: usize,
    heads: &[(usize, Vec<f32>)],
    gamma: f64,
    fonts: &Fonts,
) -> Result<(u32, u32)> {
    let l = maps.n_tokens() as i32;
    let cell = (540 / l.max(1)).clamp(12, 36);
    let font = (cell as f32 * 0.85).clamp(11.0, 15.0);
    let label = maps
        .labels
        .iter()
        .map(|s| fonts.width(&clip(s, 18), font).ceil() as i32)
        .max()
        .unwrap_or(0)
        .min(160)
        + 8;
    let lay = Layout {
        cell,
        font,
        label,
        panel_w: label + l * cell + GAP,
        panel_h: TITLE + l * cell + label + GAP,
    };
    let n = heads.len().max(1) as i32;
    let cols = (n as f64).sqrt().ceil() as i32;
    let rows = (n + cols - 1) / cols;
    let (w, h) = (
        (cols * lay.panel_w + BAR_W + GAP) as u32,
        (HEADER + rows * lay.panel_h).max(HEADER + 320) as u32,
    );
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing: {e:?}");
        root.fill(&WHITE).map_err(err)?;
        let title = format!(
            "{} · layer {layer} (layers 0–{}) · {} tokens · {} of {} heads",
            maps.model,
            maps.num_layers - 1,
            maps.n_tokens(),
            heads.len(),
            maps.num_heads
        );
        text(
            &root,
            fonts,
            &title,
            (GAP, 10),
            22.0,
            &BLACK,
            TOP_LEFT,
            false,
        )
        .map_err(err)?;
        let sub = format!(
            "rows: query tokens, columns: key tokens; each row sums to 1; colour = weight^{gamma}; \
             H: attention entropy"
        );
        text(
            &root,
            fonts,
            &sub,
            (GAP, 40),
            14.0,
            &RGBColor(80, 80, 80),
            TOP_LEFT,
            false,
        )
        .map_err(err)?;
        for (k, (head, weights)) in heads.iter().enumerate() {
            let (r, c) = (k as i32 / cols, k as i32 % cols);
            let origin = (c * lay.panel_w + GAP / 2, HEADER + r * lay.panel_h);
            draw_panel(&root, fonts, maps, *head, weights, gamma, &lay, origin).map_err(err)?;
        }
        let bar_x = cols * lay.panel_w + GAP;
        let bar_h = (rows * lay.panel_h - TITLE - GAP).clamp(200, 500);
        draw_colour_bar(&root, fonts, (bar_x, HEADER + TITLE), bar_h, gamma).map_err(err)?;
        root.present().map_err(err)?;
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    enc.write_header()?.write_image_data(&buf)?;
    Ok((w, h))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult<'a> =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>>;

/// Where the anchor point is on the text's box, horizontally and vertically: 0 = left / top,
/// 0.5 = centre, 1 = right / bottom.
#[derive(Clone, Copy)]
struct Anchor(f32, f32);

const TOP_LEFT: Anchor = Anchor(0.0, 0.0);

/// Draws `s` with its `anchor` at `pos`, `size` pixels high, laid out by [`Fonts::layout`] and
/// rasterised by ab_glyph, blended pixel by pixel onto the plotters surface. `rotated`: turned
/// 90° counter-clockwise (reading bottom to top; the anchor is taken on the unrotated box).
#[allow(clippy::too_many_arguments)]
fn text<'a>(
    area: &Area<'a>,
    fonts: &Fonts,
    s: &str,
    pos: (i32, i32),
    size: f32,
    colour: &RGBColor,
    anchor: Anchor,
    rotated: bool,
) -> DrawResult<'a> {
    let (glyphs, width, ascent, descent) = fonts.layout(s, size);
    let (ox, oy) = (anchor.0 * width, anchor.1 * (ascent - descent));
    for (font, id, x) in glyphs {
        let glyph = id.with_scale_and_position(size, point(x, ascent));
        let Some(outline) = font.outline_glyph(glyph) else {
            continue; // a space
        };
        let b = outline.px_bounds();
        let mut pixels = Vec::new();
        outline.draw(|gx, gy, cov| {
            if cov > 0.02 {
                pixels.push((b.min.x + gx as f32 - ox, b.min.y + gy as f32 - oy, cov));
            }
        });
        for (lx, ly, cov) in pixels {
            let (dx, dy) = if rotated { (ly, -lx) } else { (lx, ly) };
            let p = (pos.0 + dx.round() as i32, pos.1 + dy.round() as i32);
            area.draw_pixel(p, &colour.mix(cov.min(1.0) as f64))?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn draw_panel<'a>(
    area: &Area<'a>,
    fonts: &Fonts,
    maps: &Maps,
    head: usize,
    w: &[f32],
    gamma: f64,
    lay: &Layout,
    (x0, y0): (i32, i32),
) -> DrawResult<'a> {
    let l = maps.n_tokens();
    let st = maps.stats(w);
    let title = format!("head {head} · H {:.2} nats · {}", st.entropy, st.pattern(l));
    text(
        area,
        fonts,
        &title,
        (x0 + lay.label, y0 + 4),
        15.0,
        &BLACK,
        TOP_LEFT,
        false,
    )?;
    let (hx, hy) = (x0 + lay.label, y0 + TITLE);
    let c = lay.cell;
    for i in 0..l {
        for j in 0..l {
            let (x, y) = (hx + j as i32 * c, hy + i as i32 * c);
            let col = colour(w[i * l + j], gamma);
            area.draw(&Rectangle::new([(x, y), (x + c, y + c)], col.filled()))?;
        }
    }
    let side = l as i32 * c;
    area.draw(&Rectangle::new(
        [(hx - 1, hy - 1), (hx + side, hy + side)],
        RGBColor(120, 120, 120).stroke_width(1),
    ))?;
    let grey = RGBColor(30, 30, 30);
    for (i, label) in maps.labels.iter().enumerate() {
        let mid = i as i32 * c + c / 2;
        let clipped = clip(label, 18);
        // Query labels, right-aligned left of the row.
        let anchor = Anchor(1.0, 0.5);
        text(
            area,
            fonts,
            &clipped,
            (hx - 5, hy + mid),
            lay.font,
            &grey,
            anchor,
            false,
        )?;
        // Key labels below the column, reading bottom to top, ending at the axis.
        text(
            area,
            fonts,
            &clipped,
            (hx + mid, hy + side + 5),
            lay.font,
            &grey,
            anchor,
            true,
        )?;
    }
    Ok(())
}

fn draw_colour_bar<'a>(
    area: &Area<'a>,
    fonts: &Fonts,
    (x, y): (i32, i32),
    h: i32,
    gamma: f64,
) -> DrawResult<'a> {
    let bw = 22;
    text(
        area,
        fonts,
        "weight",
        (x, y - 22),
        14.0,
        &BLACK,
        TOP_LEFT,
        false,
    )?;
    for k in 0..h {
        // Top = 1, bottom = 0, linear in the colour coordinate w^gamma.
        let v = 1.0 - k as f64 / (h - 1) as f64;
        let col = ViridisRGB::get_color_normalized(v, 0.0, 1.0);
        area.draw(&Rectangle::new(
            [(x, y + k), (x + bw, y + k + 1)],
            col.filled(),
        ))?;
    }
    area.draw(&Rectangle::new(
        [(x - 1, y - 1), (x + bw, y + h)],
        RGBColor(120, 120, 120).stroke_width(1),
    ))?;
    let mut last_y: Option<i32> = None;
    for &t in &TICKS {
        let ty = y + ((1.0 - t.powf(gamma)) * (h - 1) as f64).round() as i32;
        if last_y.is_some_and(|last| (ty - last).abs() < 14) {
            continue; // too close to the previous tick label
        }
        last_y = Some(ty);
        area.draw(&PathElement::new(
            vec![(x + bw, ty), (x + bw + 5, ty)],
            BLACK.stroke_width(1),
        ))?;
        let label = format!("{t}");
        text(
            area,
            fonts,
            &label,
            (x + bw + 8, ty),
            13.0,
            &BLACK,
            Anchor(0.0, 0.5),
            false,
        )?;
    }
    Ok(())
}

/// At most `n` characters, with an ellipsis when cut.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}
