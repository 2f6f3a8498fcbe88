// Tandem console: the audience builder's live size preview. The rule is
// sent to /console/audiences/preview as it is typed (debounced); the answer
// is its size (estimated from a sample in a large store), or the parse error
// with its line and column.
"use strict";
(function () {
  const rule = document.getElementById("audience-rule");
  const output = document.getElementById("rule-preview");
  if (!rule || !output) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  let timer = null;
  let sent = 0;
  async function preview() {
    const text = rule.value.trim();
    if (!text) { output.textContent = "Type a rule to see its size."; output.className = ""; return; }
    const ticket = ++sent;
    output.textContent = "Counting…";
    try {
      const response = await fetch("/console/audiences/preview", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ rule: rule.value }),
        credentials: "same-origin",
      });
      const body = await response.json();
      if (ticket !== sent) return;
      if (response.ok) {
        output.className = "good";
        const count = body.size + (body.size === 1 ? " profile matches now" : " profiles match now");
        output.textContent = body.exact ? count
          : "about " + count + " (± " + body.margin + "; estimated from " + body.profiles_evaluated + " of about " + body.profiles + " profiles)";
        output.dataset.size = body.size;
      } else {
        const details = body.details;
        const where = details && details.line ? "line " + details.line + ", column " + details.column + ": " : "";
        output.className = "bad";
        output.textContent = where + body.error.message.replace(/^at (line \d+, )?column \d+: /, "");
        delete output.dataset.size;
      }
    } catch (error) {
      if (ticket === sent) { output.className = "bad"; output.textContent = "preview failed: " + error.message; }
    }
  }
  rule.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(preview, 250); });
  if (rule.value.trim()) preview();
})();
