// Sort a table by the column whose header is clicked: numbers numerically (n/a last), text alphabetically.
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = !th.classList.contains("sorted-asc");
      table.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].getAttribute("data-sort"), y = b.cells[column].getAttribute("data-sort");
        var nx = parseFloat(x), ny = parseFloat(y);
        if (isNaN(nx) && isNaN(ny)) { return ascending ? x.localeCompare(y) : y.localeCompare(x); }
        if (isNaN(nx)) { return 1; }
        if (isNaN(ny)) { return -1; }
        return ascending ? nx - ny : ny - nx;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
