// Postbox dashboard: reload a page that asks for it (data-refresh, in seconds) unless the person is busy in a form.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!(seconds > 0)) { return; }
  window.setInterval(function () {
    var active = document.activeElement;
    if (active && (active.tagName === "INPUT" || active.tagName === "SELECT")) { return; }
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" }).then(function (res) {
      if (!res.ok) { return null; }
      return res.text();
    }).then(function (html) {
      if (!html) { return; }
      var next = new DOMParser().parseFromString(html, "text/html").querySelector("main");
      var here = document.querySelector("main");
      if (next && here) { here.replaceWith(next); }
    }).catch(function () { /* the service may be restarting: try again next time */ });
  }, seconds * 1000);
}());
