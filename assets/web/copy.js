// "Copy" buttons: copy the text of the element named by data-copy to the clipboard.
document.querySelectorAll('button[data-copy]').forEach((b) => b.addEventListener('click', () => {
  const el = document.getElementById(b.dataset.copy);
  if (!el || !navigator.clipboard) return;
  navigator.clipboard.writeText(el.textContent.trim()).then(() => {
    const was = b.textContent;
    b.textContent = 'Copied';
    setTimeout(() => { b.textContent = was; }, 1500);
  });
}));
