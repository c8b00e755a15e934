% rebase('base.tpl', title=title, session=session, refresh=refresh)
<section class="counts" id="counts">
  % for name in states:
  <a class="count state-{{name}}" href="/?state={{name}}"><span class="n" data-state="{{name}}">{{counts.get(name, 0)}}</span> {{name}}</a>
  % end
  <a class="count" href="/"><span class="n">{{total}}</span> in all</a>
</section>
<form class="filters" method="get" action="/">
  <label>State <select name="state">
    <option value="">any</option>
    % for name in states:
    <option value="{{name}}" {{'selected' if name == state else ''}}>{{name}}</option>
    % end
  </select></label>
  <label>Source <select name="source">
    <option value="">any</option>
    % for name in sources:
    <option value="{{name}}" {{'selected' if name == source else ''}}>{{name}}</option>
    % end
  </select></label>
  <button type="submit">Filter</button>
</form>
<table class="jobs" id="jobs">
  <thead><tr><th>Job</th><th>Source</th><th>Algorithm</th><th>State</th><th>Created</th><th>Started</th><th>Finished</th><th>Sender AE</th><th>Send state</th></tr></thead>
  <tbody>
  % for r in rows:
  <tr class="state-{{r['status']}}">
    <td><a class="job-link" href="/dashboard/job/{{r['id']}}">{{r['id']}}</a></td>
    <td>{{r['source']}}</td><td>{{r['algorithm']}}</td><td class="state">{{r['status']}}</td>
    <td>{{r['created']}}</td><td>{{r['started']}}</td><td>{{r['finished']}}</td>
    <td>{{r['sender_ae']}}</td><td>{{r['sends']}}</td>
  </tr>
  % end
  % if not rows:
  <tr><td colspan="9" class="empty">No jobs{{' match' if state or source else ' yet'}}.</td></tr>
  % end
  </tbody>
</table>
<p class="paging">
  % if links['prev']:
  <a href="{{links['prev']}}" rel="prev">&larr; newer</a>
  % end
  page {{page}} of {{pages}} ({{shown}} job{{'' if shown == 1 else 's'}})
  % if links['next']:
  <a href="{{links['next']}}" rel="next">older &rarr;</a>
  % end
</p>
