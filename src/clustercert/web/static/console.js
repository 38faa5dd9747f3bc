// The Replace form without a page reload: the upload goes out with fetch, the rollout's
// per-node steps are polled from /rollout while it runs, and the sections the server renders
// in its answer (result, overview, nodes, history) replace the current ones. Without script,
// the form posts normally and the same answer is shown as a page. No markup is built from
// data here: node names and steps are set as text.
"use strict";

(function () {
  const form = document.getElementById("replace-form");
  if (!form) {
    return;
  }
  const progress = document.getElementById("progress");
  const phase = document.getElementById("progress-phase");
  const list = document.getElementById("progress-nodes");
  const buttons = form.querySelectorAll("button");

  function showProgress(state) {
    if (!state.in_progress) {
      return;
    }
    progress.hidden = false;
    phase.textContent = "(" + state.phase + ")";
    list.replaceChildren();
    for (const [node, step] of Object.entries(state.nodes)) {
      const item = document.createElement("li");
      item.dataset.node = node;
      item.dataset.step = step;
      item.textContent = node + ": " + step;
      list.appendChild(item);
    }
  }

  async function poll(running) {
    while (running.value) {
      try {
        const answer = await fetch("/rollout", { credentials: "same-origin", cache: "no-store" });
        if (answer.ok && running.value) {
          showProgress(await answer.json());
        }
      } catch (error) {
        // The rollout answer below is what counts; a missed poll only delays the live view.
      }
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }

  function swapSections(html) {
    const answer = new DOMParser().parseFromString(html, "text/html");
    for (const current of document.querySelectorAll("[data-swap]")) {
      const fresh = answer.getElementById(current.id);
      if (fresh) {
        current.replaceWith(document.importNode(fresh, true));
      }
    }
    const problem = answer.getElementById("error");
    if (problem) {
      // Not the certificate page (e.g. the session ended): show why in place of a result.
      document.getElementById("result").replaceChildren(document.importNode(problem, true));
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const submitter = event.submitter;
    // A button's formAction is the page's URL when it has no formaction attribute of its own.
    const url = submitter && submitter.hasAttribute("formaction") ? submitter.formAction : form.action;
    const replacing = url.endsWith("/replace");
    const body = new FormData(form);
    const running = { value: replacing };
    buttons.forEach((button) => { button.disabled = true; });
    list.replaceChildren();
    progress.hidden = true;
    const polling = poll(running);
    try {
      const answer = await fetch(url, {
        method: "POST",
        body: body,
        credentials: "same-origin",
        headers: { "X-CSRF-Token": body.get("csrf_token") },
      });
      const html = await answer.text();
      running.value = false;
      await polling;
      progress.hidden = true;
      swapSections(html);
    } catch (error) {
      running.value = false;
      const result = document.getElementById("result");
      result.textContent = "The console could not be reached: " + error;
    } finally {
      buttons.forEach((button) => { button.disabled = false; });
    }
  });
})();
