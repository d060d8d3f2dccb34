// Atelier's correspondence widget: after Match Features runs, the node shows images A and B side by side; hovering
// over a point of A marks its match in B (with its confidence). It uses only app.registerExtension and the node's
// "executed" output (ui.atelier_correspondence, sent by AtelierMatchFeatures).
import { app } from "../../scripts/app.js";

const NODE_TYPE = "AtelierMatchFeatures";
const MARGIN = 6;
const MIN_HEIGHT = 80;

function layout(node, data) {
  // Where the picture sits in the node, and its scale from picture pixels to canvas units.
  const top = (node.widgets?.length ?? 0) * 24 + 36;
  const width = node.size[0] - 2 * MARGIN;
  const scale = width / data.image.width;
  return { left: MARGIN, top, width, height: data.image.height * scale, scale };
}

function matchAt(data, x, y) {
  // (x, y) in image A's pixels -> the cell's match in B's pixels and its confidence, or null outside A.
  const [heightA, widthA] = data.size_a;
  if (x < 0 || y < 0 || x >= widthA || y >= heightA) return null;
  const [rows, cols] = data.grid;
  const row = Math.min(rows - 1, Math.floor((y / heightA) * rows));
  const col = Math.min(cols - 1, Math.floor((x / widthA) * cols));
  const cell = row * cols + col;
  return {
    a: [((col + 0.5) * widthA) / cols - 0.5, ((row + 0.5) * heightA) / rows - 0.5],
    b: [data.targets[2 * cell], data.targets[2 * cell + 1]],
    confidence: data.confidence[cell],
  };
}

app.registerExtension({
  name: "atelier.correspondence",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const data = output?.atelier_correspondence?.[0];
      if (!data?.picture) return;
      const image = new Image();
      image.onload = () => {
        this.atelierMatch = { ...data, image };
        const { top, height } = layout(this, this.atelierMatch);
        // Room for the picture and the confidence line under it.
        this.setSize([this.size[0], Math.max(this.size[1], top + Math.max(height, MIN_HEIGHT) + 3 * MARGIN)]);
        this.setDirtyCanvas(true, true);
      };
      image.src = data.picture;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      const data = this.atelierMatch;
      if (!data || this.flags?.collapsed) return;
      const box = layout(this, data);
      ctx.drawImage(data.image, box.left, box.top, box.width, box.height);
      const hit = this.atelierHover && matchAt(data, ...this.atelierHover);
      if (!hit) return;
      // Picture pixels are image pixels times data.scale; B starts right after A.
      const toCanvas = ([x, y], offset) => [
        box.left + (x + offset + 0.5) * data.scale * box.scale,
        box.top + (y + 0.5) * data.scale * box.scale,
      ];
      const [ax, ay] = toCanvas(hit.a, 0);
      const [bx, by] = toCanvas(hit.b, data.size_a[1]);
      ctx.save();
      ctx.lineWidth = 2;
      ctx.strokeStyle = `hsl(${Math.round(120 * hit.confidence)}, 90%, 55%)`; // green: mutual; red: not
      ctx.beginPath();
      ctx.moveTo(ax, ay);
      ctx.lineTo(bx, by);
      ctx.stroke();
      for (const [x, y] of [[ax, ay], [bx, by]]) {
        ctx.beginPath();
        ctx.arc(x, y, 4, 0, 2 * Math.PI);
        ctx.stroke();
      }
      ctx.fillStyle = "#fff";
      ctx.font = "11px sans-serif";
      ctx.fillText(`confidence ${hit.confidence.toFixed(2)}`, box.left + 2, box.top + box.height + 12);
      ctx.restore();
    };

    const onMouseMove = nodeType.prototype.onMouseMove;
    nodeType.prototype.onMouseMove = function (event, position) {
      onMouseMove?.apply(this, arguments);
      const data = this.atelierMatch;
      if (!data || !position) return;
      const box = layout(this, data);
      // position is relative to the node; back to image A's pixels.
      const x = (position[0] - box.left) / (box.scale * data.scale) - 0.5;
      const y = (position[1] - box.top) / (box.scale * data.scale) - 0.5;
      const inside = matchAt(data, x, y) !== null;
      const hover = inside ? [x, y] : null;
      if (JSON.stringify(hover) !== JSON.stringify(this.atelierHover ?? null)) {
        this.atelierHover = hover;
        this.setDirtyCanvas(true, false);
      }
    };
  },
});
