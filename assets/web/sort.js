// Sorts a table by a column when its header is clicked, or focused and Enter or Space
// pressed (numbers by value, text alphabetically); marks the current page in the nav.
const sortBy = (th) => {
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
};
document.querySelectorAll('table.sortable th').forEach((th) => {
  th.tabIndex = 0;
  th.addEventListener('click', () => sortBy(th));
  th.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      sortBy(th);
    }
  });
});
// The nav link of the page shown (the longest matching path: /institutions for
// /institutions/uni-a).
{
  const here = window.location.pathname;
  let best = null;
  document.querySelectorAll('header a[href^="/"]').forEach((a) => {
    const p = a.getAttribute('href');
    const match = p === '/' ? (here === '/' || here === '/overview') : (here === p || here.startsWith(p + '/'));
    if (match && (!best || p.length > best.getAttribute('href').length)) best = a;
  });
  if (best) best.setAttribute('aria-current', 'page');
}
// Forms that undo something ask first (without JavaScript they submit as before).
document.querySelectorAll('form[data-confirm]').forEach((f) => f.addEventListener('submit', (e) => {
  if (!window.confirm(f.dataset.confirm)) e.preventDefault();
}));
