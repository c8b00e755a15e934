% rebase('base.tpl', title=title, session=session)
<table id="algorithms">
  <thead><tr><th>Name</th><th>Form</th><th>Outputs</th><th>Default settings</th></tr></thead>
  % for a in rows:
  <tr><td>{{a['name']}}{{' (default)' if a['default'] else ''}}</td><td>{{a['kind']}}</td><td>{{a['outputs']}}</td><td><pre>{{a['settings']}}</pre></td></tr>
  % end
</table>
