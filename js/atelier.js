// Atelier's frontend extension: gives Atelier's nodes their own colours, so that a user sees at a glance which
// nodes come from this pack. It uses only the public app.registerExtension surface.
import { app } from "../../scripts/app.js";

const ATELIER_COLOR = "#2f4a5c";
const ATELIER_BGCOLOR = "#1d2f3b";

app.registerExtension({
  name: "atelier.core",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.category?.startsWith("atelier")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.color ??= ATELIER_COLOR;
      this.bgcolor ??= ATELIER_BGCOLOR;
      return result;
    };
  },
});
