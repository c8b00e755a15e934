% rebase('base.tpl', title=title, session=session, refresh=refresh)
<table class="facts">
  % for name, value in facts:
  % if value:
  <tr><th>{{name}}</th><td>{{value}}</td></tr>
  % end
  % end
</table>
% if warnings:
<h2>Warnings</h2>
<ul>
  % for w in warnings:
  <li>{{w}}</li>
  % end
</ul>
% end
% if has_preview:
<h2>Preview</h2>
<img id="preview" class="preview" src="/dashboard/job/{{job_id}}/preview.png" alt="contour preview of job {{job_id}}">
% end
<h2>Inputs</h2>
<table>
  <thead><tr><th>Id</th><th>Type</th><th>Path</th><th>Series</th><th>Instances</th></tr></thead>
  % for i in inputs:
  <tr><td>{{i['id']}}</td><td>{{i['type']}}</td><td>{{i['path']}}</td><td>{{i['series']}}</td><td>{{i['instances']}}</td></tr>
  % end
</table>
<h2>Outputs</h2>
<table id="outputs">
  <thead><tr><th>Name</th><th>Type</th><th>Kind</th><th>Path</th></tr></thead>
  % for o in outputs:
  <tr><td>
    % if o['exists']:
    <a class="download" href="/dashboard/job/{{job_id}}/output/{{o['n']}}" download>{{o['name']}}</a>
    % else:
    {{o['name']}} (gone)
    % end
  </td><td>{{o['type']}}</td><td>{{o['kind']}}</td><td>{{o['path']}}</td></tr>
  % end
</table>
% if checks:
<h2>Check-back Dice</h2>
<table id="checks">
  <thead><tr><th>Input</th><th>Structure</th><th>Dice</th></tr></thead>
  % for parent, name, dice in checks:
  <tr><td>{{parent}}</td><td>{{name}}</td><td>{{dice}}</td></tr>
  % end
</table>
% end
% if sends:
<h2>Sends</h2>
<table id="sends">
  <thead><tr><th>Destination</th><th>State</th><th>Files stored</th><th>Attempts</th><th>Sent</th><th>Error</th></tr></thead>
  % for s in sends:
  <tr><td>{{s['name']}}</td><td>{{s['status']}}</td><td>{{s['files']}}</td><td>{{s['attempts']}}</td><td>{{s['sent']}}</td><td>{{s['error']}}</td></tr>
  % end
</table>
% end
<h2>job.log</h2>
<pre id="log">{{log}}</pre>
