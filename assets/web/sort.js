// Click a column header to sort its table (numbers by value, text alphabetically).
document.querySelectorAll('table.sortable th').forEach((th) => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0];
  const i = Array.from(th.parentNode.children).indexOf(th);
  const desc = th.getAttribute('aria-sort') === 'ascending';
  table.querySelectorAll('th').forEach((h) => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', desc ? 'descending' : 'ascending');
  const key = (tr) => tr.children[i] ? tr.children[i].dataset.sort || tr.children[i].textContent : '';
  const num = th.classList.contains('num');
  Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    const c = num ? (parseFloat(x) || 0) - (parseFloat(y) || 0) : x.localeCompare(y);
    return desc ? -c : c;
  }).forEach((tr) => body.appendChild(tr));
}));
