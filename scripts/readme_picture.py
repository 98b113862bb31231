"""Make docs/report.png, the README's picture: three views of the demo model, offline."""

from pathlib import Path

import tlprisms as tp
from tlprisms import render
from tlprisms.demo import load_demo_model
from tlprisms.render._browser import screenshot


def main() -> None:
    model = load_demo_model()
    prism = tp.LogitPrism.run(model, "The capital of France is")
    report = render.Report("tlprisms: why the demo model says ' Paris'")
    report.add(prism.residual(" Paris"), title="Residual prism")
    report.add(prism.heads(" Paris"), title="Heads x source positions")
    out = Path(__file__).resolve().parents[1] / "docs" / "report.png"
    out.parent.mkdir(exist_ok=True)
    screenshot(report.html(), out, width=900)
    print(out)


if __name__ == "__main__":
    main()
