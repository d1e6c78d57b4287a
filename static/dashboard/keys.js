// The keyboard: H the oldest hand, Enter opens a focused row, Esc closes a panel and gives
// focus back to what opened it, ? lists the keys.
import { $ } from "./dom.js";
import { focusOldestHand } from "./queue.js";
import { closePanels, openStudent } from "./story.js";

let opener = null; // the element focused before a panel opened

// Whatever had focus outside the panels is where Esc or a close button returns to.
function noteFocus(focus) {
  if (!focus.target.closest(".panel, dialog")) opener = focus.target;
}

function close() {
  closePanels();
  if (opener?.isConnected) opener.focus();
}

function onKey(press) {
  if ($("#keys").open) return; // the dialog closes itself on Esc
  if (press.key === "Escape") return close();
  const row = press.target.closest?.("tr[data-student-id]");
  if (press.key === "Enter" && row && press.target === row) {
    press.preventDefault(); // else the same Enter presses the panel's close button, focused now
    return openStudent(row.dataset.studentId);
  }
  const typing = press.target.closest?.("input, select, textarea");
  if (typing || press.ctrlKey || press.metaKey || press.altKey) return;
  if (press.key === "h" || press.key === "H") {
    press.preventDefault();
    focusOldestHand();
  } else if (press.key === "?") {
    press.preventDefault();
    $("#keys").showModal();
  }
}

export function setUpKeys() {
  document.addEventListener("focusin", noteFocus);
  document.addEventListener("keydown", onKey);
  for (const button of document.querySelectorAll(".panel .close")) {
    button.addEventListener("click", () => opener?.isConnected && opener.focus());
  }
}
