//! `--html`: one self-contained page. Per layer: the head summary table and one inline SVG per
//! head (the heatmap as an embedded PNG image at one block of pixels per cell, token labels as
//! SVG text, which the browser draws in any script). A few lines of inline JS show query token,
//! key token and weight under the mouse; nothing is fetched.

use anyhow::Result;

use super::png_grid::{colour, TICKS};
use super::Maps;

/// Escapes text for HTML / SVG content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The heatmap of one head as a PNG, `cell` pixels per weight.
fn heatmap_png(w: &[f32], l: usize, cell: usize, gamma: f64) -> Result<Vec<u8>> {
    let side = l * cell;
    let mut rgb = vec![0u8; side * side * 3];
    for i in 0..l {
        for j in 0..l {
            let c = colour(w[i * l + j], gamma);
            for y in i * cell..(i + 1) * cell {
                for x in j * cell..(j + 1) * cell {
                    rgb[(y * side + x) * 3..][..3].copy_from_slice(&[c.0, c.1, c.2]);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side as u32, side as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        enc.write_header()?.write_image_data(&rgb)?;
    }
    Ok(out)
}

/// A weight for the page's data: 4 decimals, trailing zeros dropped.
fn short(w: f32) -> String {
    let s = format!("{w:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.into()
    }
}

const STYLE: &str =
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:18px;color:#111}
h1{font-size:20px;margin:0 0 6px}h2{font-size:17px;margin:22px 0 6px}
.text{max-width:1100px;color:#333}.note{color:#555;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:10px 18px}
svg text{font-size:11px;fill:#222}svg .t{font-size:13px;font-weight:600}
table{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
th,td{padding:1px 8px;text-align:right;border-bottom:1px solid #eee}th{border-bottom:1px solid #999}
#tip{position:fixed;pointer-events:none;background:#fffff4;border:1px solid #777;border-radius:3px;
padding:4px 7px;font-size:13px;display:none;white-space:pre;box-shadow:0 1px 4px #0003;z-index:9}
image.hm{cursor:crosshair}";

const SCRIPT: &str = r#"(function(){
const D=JSON.parse(document.getElementById('maps').textContent);
const tip=document.getElementById('tip');
function cell(img,i,j){
  const li=+img.dataset.li,hi=+img.dataset.hi,L=D.tokens.length;
  const lay=D.layers[li],hd=lay.heads[hi];
  const w=hd.w[i*L+j];
  tip.textContent='layer '+lay.layer+' · head '+hd.head+'\nquery ['+i+'] '+D.tokens[i]+
    '\nkey ['+j+'] '+D.tokens[j]+'\nweight '+w;
  const r=img.getBoundingClientRect(),c=r.width/L;
  const hl=img.parentNode.querySelector('.hl');
  const s=+img.getAttribute('width')/L;
  hl.setAttribute('x',+img.getAttribute('x')+j*s);hl.setAttribute('y',+img.getAttribute('y')+i*s);
  hl.setAttribute('width',s);hl.setAttribute('height',s);hl.style.display='';
  tip.style.display='block';
  tip.style.left=Math.min(r.left+(j+1)*c+12,innerWidth-tip.offsetWidth-4)+'px';
  tip.style.top=Math.min(r.top+(i+1)*c+12,innerHeight-tip.offsetHeight-4)+'px';
}
document.querySelectorAll('image.hm').forEach(function(img){
  img.addEventListener('mousemove',function(e){
    const r=img.getBoundingClientRect(),L=D.tokens.length;
    const j=Math.min(L-1,Math.floor((e.clientX-r.left)/r.width*L));
    const i=Math.min(L-1,Math.floor((e.clientY-r.top)/r.height*L));
    cell(img,i,j);
  });
  img.addEventListener('mouseleave',function(){
    tip.style.display='none';img.parentNode.querySelector('.hl').style.display='none';
  });
});
const m=/cell=(\d+),(\d+),(\d+),(\d+)/.exec(location.hash);
if(m){
  const img=document.querySelector('image.hm[data-layer="'+m[1]+'"][data-head="'+m[2]+'"]');
  if(img){img.scrollIntoView({block:'nearest'});cell(img,+m[3],+m[4]);}
}
})();"#;

/// The colour bar: a gradient in the colour coordinate `w^gamma` with ticks at [`TICKS`].
fn colour_bar(gamma: f64) -> String {
    let (w, h, x0) = (360.0, 14.0, 10.0);
    let mut s = format!(
        "<svg width=\"{}\" height=\"44\" role=\"img\" aria-label=\"colour bar\"><defs><linearGradient id=\"cb\">",
        w + 2.0 * x0
    );
    for k in 0..=32 {
        let v = k as f64 / 32.0; // colour coordinate
        let c = colour(v.powf(1.0 / gamma) as f32, gamma);
        s += &format!(
            "<stop offset=\"{v}\" stop-color=\"#{:02x}{:02x}{:02x}\"/>",
            c.0, c.1, c.2
        );
    }
    s += &format!(
        "</linearGradient></defs><rect x=\"{x0}\" y=\"2\" width=\"{w}\" height=\"{h}\" fill=\"url(#cb)\" stroke=\"#777\"/>"
    );
    let mut last = f64::MIN;
    for &t in &TICKS {
        let x = x0 + t.powf(gamma) * w;
        if x - last < 26.0 {
            continue;
        }
        last = x;
        s += &format!(
            "<line x1=\"{x}\" x2=\"{x}\" y1=\"{}\" y2=\"{}\" stroke=\"#000\"/><text x=\"{x}\" y=\"38\" text-anchor=\"middle\">{t}</text>",
            2.0 + h,
            6.0 + h
        );
    }
    s + "</svg>"
}

/// The whole page.
pub fn page(maps: &Maps, gamma: f64) -> Result<String> {
    let l = maps.n_tokens();
    let cell = (480 / l.max(1)).clamp(8, 32);
    let label_w = maps
        .labels
        .iter()
        .map(|s| s.chars().count().min(18))
        .max()
        .unwrap_or(1) as f64
        * 7.0
        + 8.0;
    let side = (l * cell) as f64;
    let mut body = String::new();
    let mut data_layers = Vec::new();
    for (li, (layer, heads)) in maps.layers.iter().enumerate() {
        body += &format!("<section><h2>Layer {layer}</h2>\n");
        body += "<table><tr><th>head</th><th title=\"mean over query rows of -Σ p ln p\">entropy (nats)</th>\
                 <th title=\"mean over query rows of Σ p·|i−j|\">distance</th><th>first</th><th>[SEP]</th>\
                 <th>previous</th><th>self</th><th>pattern</th></tr>\n";
        for (h, w) in heads {
            let st = maps.stats(w);
            body += &format!(
                "<tr><td>{h}</td><td>{:.3}</td><td>{:.2}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>\n",
                st.entropy, st.distance, st.first, st.sep, st.previous, st.itself, esc(st.pattern(l))
            );
        }
        body += "</table>\n<div class=\"grid\">\n";
        let mut data_heads = Vec::new();
        for (hi, (h, w)) in heads.iter().enumerate() {
            let st = maps.stats(w);
            let png = heatmap_png(w, l, cell, gamma)?;
            let (x0, y0) = (label_w, 24.0);
            let (width, height) = (x0 + side + 8.0, y0 + side + label_w);
            body += &format!(
                "<svg width=\"{width}\" height=\"{height}\" xmlns=\"http://www.w3.org/2000/svg\">\
                 <title>layer {layer} head {h}: entropy {:.3} nats, distance {:.2}, first {:.3}, [SEP] {:.3}, previous {:.3}, self {:.3}</title>\
                 <text class=\"t\" x=\"{x0}\" y=\"16\">head {h} · {}</text>\
                 <image class=\"hm\" data-li=\"{li}\" data-hi=\"{hi}\" data-layer=\"{layer}\" data-head=\"{h}\" x=\"{x0}\" y=\"{y0}\" width=\"{side}\" height=\"{side}\" href=\"data:image/png;base64,{}\"/>\
                 <rect class=\"hl\" fill=\"none\" stroke=\"#f0f\" stroke-width=\"2\" style=\"display:none;pointer-events:none\"/>",
                st.entropy,
                st.distance,
                st.first,
                st.sep,
                st.previous,
                st.itself,
                esc(st.pattern(l)),
                base64(&png)
            );
            for (i, label) in maps.labels.iter().enumerate() {
                let mid = (i * cell) as f64 + cell as f64 / 2.0;
                let shown = esc(&clip(label, 18));
                body += &format!(
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" dominant-baseline=\"central\">{shown}</text>\
                     <text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"end\" dominant-baseline=\"central\">{shown}</text>",
                    x0 - 4.0,
                    y0 + mid,
                    x0 + mid,
                    y0 + side + 4.0
                );
            }
            body += "</svg>\n";
            let ws: Vec<String> = w.iter().map(|&x| short(x)).collect();
            data_heads.push(format!("{{\"head\":{h},\"w\":[{}]}}", ws.join(",")));
        }
        body += "</div></section>\n";
        data_layers.push(format!(
            "{{\"layer\":{layer},\"heads\":[{}]}}",
            data_heads.join(",")
        ));
    }
    let data = format!(
        "{{\"tokens\":{},\"layers\":[{}]}}",
        serde_json::to_string(&maps.labels)?,
        data_layers.join(",")
    )
    // JSON inside <script>: no "</" may appear.
    .replace("</", "<\\/");
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Attention maps · {model}</title><style>{STYLE}</style></head><body>\n\
         <h1>Attention maps · {model} · {l} tokens</h1>\n<p class=\"text\">{text}</p>\n\
         <p class=\"note\">Rows: query tokens; columns: key tokens; each row sums to 1. Hover a cell for \
         query, key and weight. Colour = weight<sup>{gamma}</sup>:</p>{bar}\n{body}\
         <div id=\"tip\"></div>\n<script type=\"application/json\" id=\"maps\">{data}</script>\n\
         <script>{SCRIPT}</script>\n</body></html>\n",
        model = esc(&maps.model),
        text = esc(&maps.text),
        bar = colour_bar(gamma),
    ))
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
