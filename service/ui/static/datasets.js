// /ui: every dataset the signed-in key may see, with its budget bar and figures.

import {
  allPages,
  budgetBar,
  budgetNumbers,
  datasetUrl,
  el,
  setStatus,
  startPage,
} from "./common.js";

async function load() {
  const list = document.getElementById("datasets");
  setStatus("Loading datasets…");
  list.replaceChildren();
  const datasets = await allPages("/v1/datasets", (dataset) => dataset.id);
  for (const dataset of datasets) {
    const title = el(
      "h2",
      { class: "dataset-title" },
      el("a", { href: datasetUrl(dataset.id), text: dataset.id }),
      dataset.frozen ? el("span", { class: "badge", text: "frozen" }) : null,
      dataset.outside_guarantee
        ? el("span", { class: "badge badge-warn", text: "outside the filter's guarantee" })
        : null,
      dataset.epsilon_reserved > dataset.epsilon_cap
        ? el("span", { class: "badge badge-warn", text: "reserved above cap" })
        : null,
    );
    list.append(
      el(
        "li",
        { class: "dataset-card", "data-dataset": dataset.id },
        title,
        dataset.description ? el("p", { class: "description", text: dataset.description }) : null,
        budgetBar(dataset),
        budgetNumbers(dataset),
      ),
    );
  }
  const count = datasets.length;
  setStatus(
    count === 0
      ? "No datasets are visible to this key."
      : `${count} dataset${count === 1 ? "" : "s"}.`,
  );
}

startPage(load);
