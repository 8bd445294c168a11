// nanofleet dashboard: live regions (polling, no full reload) and confirmation dialogs. No dependencies.
(function () {
  "use strict";
  var POLL_MS = 2000;
  var dialogOpen = false;

  function csrf() {
    var m = document.querySelector('meta[name="csrf-token"]');
    return m ? m.getAttribute("content") : "";
  }

  // Live regions: <div data-live="/ui/fragments/..."> is refreshed in place from the server.
  function poll(el) {
    var url = el.getAttribute("data-live");
    var busy = false;
    function tick() {
      if (busy || dialogOpen || document.hidden) return;
      // Do not swap the region from under someone's keyboard focus or open <details>.
      busy = true;
      fetch(url, {
        credentials: "same-origin",
        headers: { "X-Requested-With": "fetch", "X-Page": location.pathname + location.search },
        cache: "no-store",
      })
        .then(function (r) {
          if (r.status === 401) {
            return r.json().then(function (b) { location.assign(b.login || "/login"); });
          }
          if (!r.ok) return null;
          return r.text().then(function (html) {
            if (html === el.getAttribute("data-last")) return;
            var focusedId = document.activeElement && el.contains(document.activeElement) ? document.activeElement.id : null;
            var open = Array.prototype.map.call(el.querySelectorAll("details[open]"), function (d, i) { return i; });
            el.innerHTML = html;
            el.setAttribute("data-last", html);
            var details = el.querySelectorAll("details");
            open.forEach(function (i) { if (details[i]) details[i].open = true; });
            if (focusedId) {
              var f = document.getElementById(focusedId);
              if (f) f.focus();
            }
            bindConfirms(el);
            el.dispatchEvent(new CustomEvent("live:updated", { bubbles: true }));
          });
        })
        .catch(function () { /* offline for a moment: the next tick retries */ })
        .then(function () {
          busy = false;
          var n = Number(document.body.getAttribute("data-live-ticks") || "0") + 1;
          document.body.setAttribute("data-live-ticks", String(n));
        });
    }
    setInterval(tick, POLL_MS);
  }

  // Confirmation: forms with class "confirm" ask first in a <dialog>, then submit with confirmed=yes.
  function bindConfirms(root) {
    root.querySelectorAll("form.confirm").forEach(function (form) {
      if (form.getAttribute("data-bound")) return;
      form.setAttribute("data-bound", "1");
      form.addEventListener("submit", function (ev) {
        var field = form.querySelector('input[name="confirmed"]');
        if (field && field.value === "yes") return;
        ev.preventDefault();
        ask(form.getAttribute("data-confirm") || "Are you sure?", function () {
          field.value = "yes";
          form.submit();
        });
      });
    });
  }

  function ask(text, onOk) {
    var dlg = document.getElementById("confirm-dialog");
    if (!dlg || typeof dlg.showModal !== "function") {
      if (window.confirm(text)) onOk();
      return;
    }
    document.getElementById("confirm-text").textContent = text;
    dialogOpen = true;
    var opener = document.activeElement;
    dlg.returnValue = "";
    dlg.showModal();
    document.getElementById("confirm-cancel").focus();
    dlg.addEventListener("close", function onClose() {
      dlg.removeEventListener("close", onClose);
      dialogOpen = false;
      if (dlg.returnValue === "ok") onOk();
      else if (opener && opener.focus) opener.focus();
    });
  }

  // Coming back to a page from the history (back/forward cache) must not skip the next confirmation.
  window.addEventListener("pageshow", function () {
    document.querySelectorAll('form.confirm input[name="confirmed"]').forEach(function (f) { f.value = ""; });
  });

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(poll);
    bindConfirms(document);
    // Fetches from scripts carry the CSRF token too (forms carry it as a hidden field).
    window.nanofleetCsrf = csrf;
  });
})();
