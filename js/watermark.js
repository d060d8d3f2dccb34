// Atelier's watermark detector display: after Detect Watermark runs, the node shows its verdict (one line per
// image: watermarked or not, p-value, bit accuracy, payload) under its widgets. It uses only
// app.registerExtension and the node's "executed" output (ui.text, sent by AtelierDetectWatermark).
import { app } from "../../scripts/app.js";

const NODE_TYPE = "AtelierDetectWatermark";
const LINE_HEIGHT = 16;
const MARGIN = 8;

app.registerExtension({
  name: "atelier.watermark",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = Array.isArray(output?.text) ? output.text.join("\n") : "";
      this.atelierVerdict = text ? text.split("\n") : null;
      this.setDirtyCanvas?.(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (!this.atelierVerdict || this.flags?.collapsed) return result;
      ctx.save();
      ctx.font = "12px sans-serif";
      const top = this.size[1] + MARGIN;
      this.atelierVerdict.forEach((line, i) => {
        ctx.fillStyle = line.includes("no watermark") ? "#e57373" : "#81c784";
        ctx.fillText(line, MARGIN, top + (i + 1) * LINE_HEIGHT, this.size[0] * 3);
      });
      ctx.restore();
      return result;
    };
  },
});
